"""What every adaptive solver shares: fused stage combinations, error norms and the failure flag.

The step loop of an adaptive solver runs attempts until every sample reached its end time.  It must
never hang: a non-finite stage ends it with ``NonFiniteError`` and a step size that stopped moving
the time (a blow-up) with ``SolverError``; neither is read on the host inside an attempt.  Each
attempt updates a small device record (``no_failure`` / ``record_failure``) and the loop's
``done`` test reads it together with the samples' times, once per eager attempt or once every few
replays of a captured attempt; ``raise_failure`` turns it into the error after the loop.

Error norms (DESIGN.md "Batch invariance"): ``"sample"`` is the RMS of each sample's scaled error
through ``sf.ops.sample_sumsq`` (fixed summation tree: a sample's steps do not depend on the
batch); ``"batch"`` is one RMS over the whole batch, as scipy's ``solve_ivp`` and score_sde do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from ..backends import resolve
from ..errors import NonFiniteError
from ..ops.fused_update import _run, fused_update_op
from ..ops.sample_norm import sample_sumsq

ERROR_NORMS = ("sample", "batch")
NONFINITE, STUCK = 1.0, 2.0  # failure codes
MAX_TERMS = 4  # terms per fused pass on the triton and cuda backends (cpu and torch take any number)


class SolverError(RuntimeError):
    """An adaptive solver could not finish: ``max_steps`` attempts ran out, or the step size of a
    sample fell below what its time can resolve (a solution that blows up)."""


def check_options(rtol, atol, max_steps, error_norm) -> tuple[float, float, int]:
    """Validated (rtol, atol, max_steps); errors name the argument."""
    rtol = _checks.check_finite_scalar("rtol", rtol, positive=True)
    atol = _checks.check_finite_scalar("atol", atol, positive=True)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int):
        raise TypeError(f"max_steps: expected an int, got {type(max_steps).__name__}")
    if max_steps < 1:
        raise ValueError(f"max_steps: must be >= 1, got {max_steps}")
    if error_norm not in ERROR_NORMS:
        raise ValueError(f"error_norm: expected one of {ERROR_NORMS}, got {error_norm!r}")
    return rtol, atol, max_steps


def state_backend(like: Tensor, backend: str | None) -> str:
    """The fused ops' backend for a state like ``like`` (float64 states: the torch reference)."""
    if like.dtype == torch.float64 and backend is None:
        return "torch"
    return resolve(backend, like.device, like.dtype)


class Combos:
    """Fixed linear combinations of a step's stage values, each one ``fused_update`` pass per row block.

    ``combos[key] = weights`` with ``weights[0]`` the first input's and ``weights[1:]`` the others':
    each weight is (const, mult), the coefficient const + mult * h of that input for a per-sample
    step h [B].  ``prepare(h)`` builds every coefficient of the attempt at once, a [rows, B] table in
    one ``addcmul`` (one float32 cast for the kernels), laid out so that each pass's coefficient
    matrix [x, terms..., noise] is a contiguous block of rows; ``__call__(key, x, terms)`` then runs
    the passes (terms with zero weight skipped; at most ``MAX_TERMS`` a pass on the triton and cuda
    backends).  Batch-invariant: each element's arithmetic is one fixed chain of fmas.
    """

    def __init__(self, combos: dict, like: Tensor, backend: str | None):
        self.fused = FusedRows(like, backend)
        limit = None if self.fused.name in ("cpu", "torch") else MAX_TERMS
        self.dtype = torch.float64 if self.fused.name == "torch" else torch.float32
        base: list[float] = []
        mult: list[float] = []
        self.passes: dict = {}
        for key, weights in combos.items():
            first, rest = weights[0], [(j, w) for j, w in enumerate(weights[1:]) if w != (0.0, 0.0)]
            passes = []
            while True:
                chunk = rest if limit is None else rest[:limit]
                rest = rest[len(chunk) :]
                start = len(base)
                for c, m in [first, *(w for _, w in chunk), (0.0, 0.0)]:  # x, terms, noise
                    base.append(c)
                    mult.append(m)
                passes.append((start, len(base), [j for j, _ in chunk]))
                if not rest:
                    break
                first = (1.0, 0.0)  # the next pass adds to the last one's output
            self.passes[key] = passes
        dev = like.device
        self.base = torch.tensor(base, dtype=torch.float64, device=dev)[:, None]
        self.mult = torch.tensor(mult, dtype=torch.float64, device=dev)[:, None]
        self.table: Tensor | None = None

    def prepare(self, h: Tensor) -> None:
        """This attempt's coefficients for the per-sample step h [B] (float64)."""
        self.table = torch.addcmul(self.base, self.mult, h[None, :]).to(self.dtype)

    def __call__(self, key, x: Tensor, terms) -> Tensor:
        """combos[key] applied to x and terms (contiguous [B, D] rows, bf16/fp16 terms allowed)."""
        out = x
        for start, stop, which in self.passes[key]:
            out = self.fused(out, [terms[j] for j in which], self.table[start:stop])
        return out


class FusedRows:
    """``fused_update`` of contiguous [B, D] rows with a ready coefficient matrix [len(terms) + 2, B]
    (x, terms, noise) and no noise: the op when tracing or recording autograd, else the backend's
    kernel directly (no per-call coefficient building)."""

    def __init__(self, like: Tensor, backend: str | None):
        self.name = state_backend(like, backend)
        self.ids = torch.zeros(like.shape[0], dtype=torch.int64, device=like.device)
        self.counter = torch.zeros((), dtype=torch.int64, device=like.device)

    def __call__(self, x: Tensor, terms: list[Tensor], coefs: Tensor) -> Tensor:
        if _checks.use_custom_op(x, coefs, *terms):
            return fused_update_op(x, terms, coefs, self.counter, self.counter, 0, self.ids, False, self.name)
        out = torch.empty_like(x)
        _run(out, x, terms, coefs, 0, 0, 0, self.ids, False, self.name)
        return out


def scaled_sumsq(err: Tensor, y: Tensor, y_new: Tensor, rtol: float, atol: float) -> Tensor:
    """sum_e (err_e / (atol + rtol max(|y_e|, |y_new_e|)))^2 per sample [B] (float64), fixed tree."""
    scale = torch.maximum(y.abs(), y_new.abs()).mul_(rtol).add_(atol)
    return sample_sumsq(err / scale).double()


def error_norm(sumsq: Tensor, numel: int, mode: str) -> Tensor:
    """RMS scaled error [B] from per-sample sums of squares over ``numel`` elements each."""
    if mode == "batch":
        return (sumsq.sum() / (sumsq.shape[0] * numel)).sqrt().expand(sumsq.shape[0])
    return (sumsq / numel).sqrt()


def no_failure(device: torch.device) -> Tensor:
    """The failure record (float64 [5]: attempt, code, time, batch position, step); attempt -1 = none."""
    return torch.tensor([-1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64, device=device)


def record_failure(failure: Tensor, n, t: Tensor, h: Tensor, nonfinite: Tensor, stuck: Tensor) -> Tensor:
    """Keep the first failure: attempt n (int or 0-d device tensor), code, the first failing sample's
    time, batch position and step size.  No host read (a captured attempt runs it)."""
    bad = nonfinite | stuck
    first = bad.to(torch.int8).argmax().reshape(1)  # the first failing sample (index_select: no host read)
    code = torch.where(nonfinite.index_select(0, first), NONFINITE, STUCK)
    n = n.to(torch.float64) if isinstance(n, Tensor) else torch.tensor(float(n), dtype=torch.float64)
    new = torch.cat(
        [n.to(t.device).reshape(1), code, t.index_select(0, first), first.to(torch.float64), h.index_select(0, first)]
    )
    return torch.where(bad.any() & (failure[0] < 0), new, failure)


def stuck(active: Tensor, t: Tensor, h: Tensor) -> Tensor:
    """Samples whose step no longer moves their float64 time (h under a few ulps of t)."""
    return active & (h <= 8 * torch.finfo(torch.float64).eps * t.abs())


def running(active: Tensor, failure: Tensor) -> bool:
    """One host read: some sample is still active and nothing failed."""
    return bool(active.any() & (failure[0] < 0))


def raise_failure(failure: Tensor, name: str, *, ids: Tensor | None = None) -> None:
    """Raise the recorded failure, if any (one host read)."""
    n, code, t, pos, h = failure.tolist()
    if n < 0:
        return
    sample = int(pos) if ids is None else int(ids[int(pos)])
    where = f"step {int(n)} (the attempt from t = {t:.6g} with step {h:.3g}, sample {sample})"
    if code == NONFINITE:
        raise NonFiniteError(f"{name}: non-finite values at {where}: the score or the state is NaN/inf")
    raise SolverError(
        f"{name}: the step size underflowed at {where}: the solution blows up or the problem is too stiff "
        "for this tolerance"
    )


def raise_max_steps(name: str, active: Tensor, t: Tensor, h: Tensor, t_end, max_steps: int) -> None:
    """The loop ran out of attempts: say how many samples were left, where, and what to change."""
    left = int(active.sum())
    if not left:
        return
    first = int(active.to(torch.int8).argmax())
    end = float(t_end[first]) if isinstance(t_end, Tensor) else float(t_end)
    raise SolverError(
        f"max_steps: {name} stopped after {max_steps} attempts with {left} of {active.shape[0]} samples short "
        f"of t = {end:g} (sample {first} at t = {float(t[first]):.6g}, step {float(h[first]):.3g}); "
        "raise max_steps or loosen rtol/atol"
    )
