"""What every adaptive solver shares: fused stage combinations, error norms and the failure flag.

The step loop of an adaptive solver runs attempts until every sample reached its end time.  It must
never hang: a non-finite stage ends it with ``NonFiniteError`` and a step size that stopped moving
the time (a blow-up) with ``SolverError``; neither is read on the host inside an attempt.  Each
attempt's controller (``sf.ops.step_control``) updates a small device record, the state's ``fail``
row, and the loop's ``done`` test reads it together with the samples' times (``running``), once per
eager attempt or once every few replays of a captured attempt; ``raise_failure`` turns it into the
error after the loop.

Error norms (DESIGN.md "Batch invariance"): ``"sample"`` is the RMS of each sample's scaled error
through ``sf.ops.sample_sumsq`` (fixed summation tree: a sample's steps do not depend on the
batch); ``"batch"`` is one RMS over the whole batch, as scipy's ``solve_ivp`` and score_sde do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, backends
from ..backends import resolve
from ..errors import NonFiniteError
from ..ops.fused_update import fused_update_op
from ..ops.select_rows import select_rows
from ..ops.step_control import ACTIVE, FAIL, HS, REJECTED, ROWS, STEPS, H, R, T, step_control  # noqa: F401 (the solvers read rows)

ERROR_NORMS = ("sample", "batch")
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
    backends, or ``limit``).  Batch-invariant: each element's arithmetic is one fixed chain of fmas.
    """

    def __init__(self, combos: dict, like: Tensor, backend: str | None, *, limit: int | None = None):
        self.fused = FusedRows(like, backend)
        if limit is None:
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
        self.impl = backends.get(self.name)
        self.ids = torch.zeros(like.shape[0], dtype=torch.int64, device=like.device)
        self.counter = torch.zeros((), dtype=torch.int64, device=like.device)

    def _ids(self, rows: Tensor) -> Tensor:
        """Sample ids for ``rows`` (zeros: no noise is drawn; fewer rows once samples retired)."""
        return self.ids if rows.shape[0] == self.ids.shape[0] else self.ids[: rows.shape[0]]

    def __call__(self, x: Tensor, terms: list[Tensor], coefs: Tensor) -> Tensor:
        if _checks.use_custom_op(x, coefs, *terms):
            return fused_update_op(x, terms, coefs, self.counter, self.counter, 0, self._ids(x), False, self.name)
        out = torch.empty_like(x)
        self.impl.fused_update(out, x, terms, coefs, self._ids(x), 0, 0, 0, False)  # coefs: the kernel's dtype
        return out

    def noisy(self, x: Tensor, terms: list[Tensor], coefs: Tensor, seed: Tensor, step, ids: Tensor) -> Tensor:
        """The same with the sampler's noise (stream 0, Philox step ``step``, sample ``ids``) and its
        coefficient, the last row of ``coefs``."""
        if _checks.use_custom_op(x, coefs, *terms):
            step = _checks.counter_tensor(step)
            return fused_update_op(x, terms, coefs, seed, step, 0, ids, True, self.name)
        out = torch.empty_like(x)
        backends.get(self.name).fused_update(out, x, terms, coefs, ids, seed, step, 0, True)  # reads seed, step
        return out


class Controller:
    """An adaptive solver's per-sample step control: per attempt, one ``sf.ops.step_control`` launch
    (accept/reject, counts, the step-size rule, the failure record, and the next attempt's step, stage
    times and ``Combos`` table) and one ``sf.ops.select_rows`` launch (the accepted rows).

    ``start(r, h)`` makes the state [9, B] (rows ``ROWS``), the stage times [S, B] and the table of the
    first attempt; ``__call__(n, state, sumsq, stage_t, table, news, olds)`` ends attempt n and returns
    [where(accept, new, old) for each pair] (rows).  ``rule_args``: the op's rule, safety, exponent,
    e_min_grow, e_min_retry, e_max; ``error_norm`` "sample" or "batch"."""

    def __init__(self, t_end, direction, c_stage, combine: Combos | None, *, numel: int, error_norm: str,
                 backend: str | None = None, **rule_args):  # fmt: skip
        dev = t_end.device
        self.t_end, self.direction, self.c_stage = t_end.contiguous(), direction.contiguous(), c_stage.contiguous()
        if combine is not None:
            self.base, self.mult = combine.base[:, 0].contiguous(), combine.mult[:, 0].contiguous()
            self.dtype, self.backend = combine.dtype, combine.fused.name
        else:
            self.base = self.mult = torch.zeros(0, dtype=torch.float64, device=dev)
            self.dtype, self.backend = torch.float64, backend
        self.args = dict(numel=numel, batch_norm=error_norm == "batch", backend=self.backend, trusted=True, **rule_args)

    def start(self, r: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(state, stage_t, table) before the first attempt, for remaining times r and steps h [B]."""
        B, dev = r.shape[0], r.device
        state = torch.zeros(len(ROWS), B, dtype=torch.float64, device=dev)
        state[R], state[H], state[FAIL] = r, h, -1.0
        stage_t = torch.empty(self.c_stage.shape[0], B, dtype=torch.float64, device=dev)
        table = torch.empty(self.base.shape[0], B, dtype=self.dtype, device=dev)
        step_control(state, None, *self._fixed(0, stage_t, table), advance=False, **self.args)
        return state, stage_t, table

    def _fixed(self, n, stage_t, table):
        return self.t_end, self.direction, n, self.c_stage, stage_t, self.base, self.mult, table

    def __call__(self, n, state: Tensor, sumsq: Tensor, stage_t: Tensor, table: Tensor, news, olds) -> list[Tensor]:
        return self.decide(n, state, sumsq, stage_t, table, news, olds)[1]

    def decide(self, n, state, sumsq, stage_t, table, news, olds) -> tuple[Tensor, list[Tensor]]:
        """``__call__`` that also returns the accept mask [B] (bool)."""
        accept = step_control(state, sumsq, *self._fixed(n, stage_t, table), **self.args)
        return accept, select_rows(accept, news, olds, backend=self.backend, trusted=True)

    def set_step(self, state: Tensor, stage_t: Tensor, h: Tensor) -> None:
        """Replace the coming attempt's step by ``h`` [B] (float64, at most the time left): the state's
        h rows and the stage times, by the op's own formula (a sample whose h is unchanged keeps its
        times bit for bit).  Solvers with a coefficient table (``combine``) do not use this."""
        if self.base.numel():
            raise AssertionError("set_step: the Combos table would need rebuilding")
        state[H].copy_(h)
        state[HS].copy_(h * self.direction if self.args["rule"] == "rk45" else h)
        stage_t.copy_(torch.addcmul(state[T], self.c_stage[:, None], state[HS]))


def tree_sum(v: Tensor) -> Tensor:
    """Sums over the last dim in a fixed pairwise tree (zero-padded to a power of two): elementwise
    adds only, so a sample's sum never depends on the batch (torch's reductions may)."""
    width = 1
    while width < v.shape[-1]:
        width *= 2
    if width != v.shape[-1]:
        v = torch.nn.functional.pad(v, (0, width - v.shape[-1]))
    while v.shape[-1] > 1:
        half = v.shape[-1] // 2
        v = v[..., :half] + v[..., half:]
    return v[..., 0]


def scaled(err: Tensor, y: Tensor, y_new: Tensor, rtol: float, atol: float) -> Tensor:
    """err / (atol + rtol max(|y|, |y_new|)) elementwise."""
    return err / torch.maximum(y.abs(), y_new.abs()).mul_(rtol).add_(atol)


def error_norm(sumsq: Tensor, numel: int, mode: str) -> Tensor:
    """RMS scaled error [B] from per-sample sums of squares over ``numel`` elements each."""
    if mode == "batch":
        return (sumsq.sum() / (sumsq.shape[0] * numel)).sqrt().expand(sumsq.shape[0])
    return (sumsq / numel).sqrt()


def left_and_failed(remaining: Tensor, fail: Tensor) -> tuple[int, int]:
    """One host read: how many samples still have time to go, and how many failed."""
    left, failed = torch.stack([(remaining > 0).sum(), (fail >= 0).sum()]).tolist()
    return left, failed


def running(remaining: Tensor, fail: Tensor) -> bool:
    """One host read: some sample still has time to go and none failed."""
    left, failed = left_and_failed(remaining, fail)
    return left > 0 and failed == 0


def raise_failure(fail: Tensor, name: str, t: Tensor, *, ids: Tensor | None = None) -> None:
    """Raise the first recorded failure, if any (host reads): its attempt, time and sample."""
    failed = fail >= 0
    if not bool(failed.any()):
        return
    first = int(torch.where(failed, fail, torch.inf).argmin())
    record = float(fail[first])
    sample = first if ids is None else int(ids[first])
    where = f"step {int(record)} (the attempt from t = {float(t[first]):.6g}, sample {sample})"
    if record % 1 == 0:
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
