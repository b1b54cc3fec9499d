"""Dormand–Prince RK5(4) with per-sample time, step size and accept/reject, on the device.

Every sample integrates dy/dt = fn(y, t) from its own t0 to t1 with its own step size; a step is
accepted where the scaled error norm is <= 1 (masked update), so samples never wait on or
influence each other: a sample's trajectory, step sequence and NFE do not depend on the batch.
Each stage's state, the error estimate and the quadrature update are one ``fused_update`` pass
each; the error norm goes through ``sf.ops.sample_sumsq`` (fixed summation order, DESIGN.md), or
is one norm over the batch with ``error_norm="batch"`` (scipy's rule; not batch-invariant).

A quadrature part q (``q0``, float64 [B, m]) integrates dq/dt = g(y, t) beside y, with fn returning
(dy, dq): q never feeds back into fn, so it takes no part in the stages, only in the accepted
update and the error norm (the likelihood's log-density change, accumulated in float64 whatever
the state's dtype).

The loop ends when every sample reached t1 (one host read per attempt, or per block of replays
when an attempt is captured as a CUDA graph).  In the default eager loop with the per-sample error
norm, samples that reached t1 retire from the batch (``_retiring_attempts``): later attempts, and
so the network, run on the samples still integrating only, which leaves every sample's result
unchanged (its arithmetic is its own row's) and spends evaluations on unfinished samples only.
A non-finite stage ends it with ``NonFiniteError`` naming the attempt and time, a step size that
stopped moving the time with ``SolverError``, and so does running out of ``max_steps``
(``scorefast.solvers.adaptive``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _checks
from ..ops.scaled_sumsq import scaled_sumsq
from . import adaptive

C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
B5 = A[6] + (0.0,)
B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
ERR = tuple(b5 - b4 for b5, b4 in zip(B5, B4))
SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0


@dataclass
class Solution:
    y: Tensor  # [B, ...] at t1
    nfe: Tensor  # [B] int64: evaluations each sample took part in while active
    steps: Tensor  # [B] accepted steps
    rejected: Tensor  # [B] rejected steps
    q: Tensor | None = None  # [B, m] float64 quadrature at t1, when q0 was given


def _eager_attempts(body, carry, start, stop, *, done):
    for n in range(start, stop):
        if done(carry):
            break
        carry = body(n, *carry)
    return carry


class _Live:
    """The per-sample constants of the samples an attempt runs on (all of them, or those that have
    not retired): fn's ``per_sample`` rows [b, ...] and the controller's end times and directions [b]."""

    def __init__(self, per_sample: tuple):
        self.rows, self.control = tuple(per_sample), None

    def select(self, keep: Tensor) -> None:
        self.rows = tuple(r[keep] for r in self.rows)
        c = self.control
        c.t_end, c.direction = c.t_end[keep], c.direction[keep]


def _retiring_attempts(live: _Live, batch_dims: tuple[int, ...]):
    """An eager attempt loop in which samples that reached t1 (r = 0 in the controller's state,
    ``carry[4]``) leave the batch: their final values are written to the output once, and later
    attempts run on the others (gathered once max(1, b // 16) of the b working samples finished).
    ``batch_dims``: each carry tensor's sample dim.  Only for the per-sample error norm (a batch norm
    over fewer samples would change the steps).  One host read per attempt, as ``done``'s: the
    number of samples still going and of those that failed."""

    def run(body, carry, start, stop, *, done):
        out = tuple(c.clone() for c in carry)
        where = torch.arange(carry[0].shape[0], device=carry[0].device)
        for n in range(start, stop):
            state = carry[4]
            left, failed = adaptive.left_and_failed(state[adaptive.R], state[adaptive.FAIL])
            if not left or failed:  # = done(carry), the same one read
                break
            going = state[adaptive.R] > 0
            b = going.shape[0]
            if b - left >= max(1, b // 16):
                gone, keep = (~going).nonzero().squeeze(1), going.nonzero().squeeze(1)
                for full, c, dim in zip(out, carry, batch_dims):
                    full.index_copy_(dim, where[gone], c.index_select(dim, gone))
                carry = tuple(c.index_select(dim, keep) for c, dim in zip(carry, batch_dims))
                where = where[keep]
                live.select(keep)
            carry = body(n, *carry)
        for full, c, dim in zip(out, carry, batch_dims):
            full.index_copy_(dim, where, c)
        return out

    return run


def solve(
    fn: Callable,
    y0: Tensor,
    t0,
    t1,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    h0: float | None = None,
    max_steps: int = 100_000,
    backend: str | None = None,
    attempts: Callable | None = None,
    error_norm: str = "sample",
    q0: Tensor | None = None,
    name: str = "rk45",
    sample_ids: Tensor | None = None,
    time_coefs: Callable | None = None,
    per_sample: tuple[Tensor, ...] = (),
    retire: bool = True,
    skip_idle_quadrature: bool = False,
) -> Solution:
    """Integrate dy/dt = fn(y, t [B] float64) from t0 to t1 (floats or [B]); y0 [B, ...].

    Error control per sample: RMS over elements of err / (atol + rtol * max(|y|, |y_new|)) <= 1
    (``error_norm="batch"``: one RMS over the batch).  ``h0``: the first step as a fraction of the
    span (default: chosen per sample from the derivatives, Hairer, Norsett & Wanner II.4, one NFE).
    ``q0`` (float64 [B, m]): a quadrature dq/dt = g(y, t) beside y; fn then returns (dy, dq).
    ``name`` and ``sample_ids`` (global ids) are what an error message names.
    ``time_coefs(t [S, B]) -> tuple of [S, ...] tensors``: coefficients that depend on time only,
    computed once per attempt for all stage times; fn is then called as fn(y, t, *row_i) with
    stage i's rows (an ODE drift's schedule, without recomputing it per stage).
    ``per_sample``: batch-first tensors [B, ...] handed to fn after those coefficients, as the rows
    of the samples fn is called on: fn(y, t, *coefs, *rows) (what fn knows per sample, e.g. the
    likelihood's probes, follows its sample when finished samples retire from the batch).
    ``retire``: in the default eager loop with ``error_norm="sample"``, samples that reached t1 leave
    the batch (fn then sees fewer rows; ``False`` keeps every call at B rows).
    ``skip_idle_quadrature`` (with q0): Dormand–Prince's second stage has weight zero in both the
    solution and the error estimate, so its dq is never used; fn is then called with the keyword
    ``quadrature=False`` there and may return (dy, None) (the likelihood skips its divergence, the
    network's backward pass, at that stage), and with ``quadrature=True`` at every other evaluation.
    ``attempts`` runs the step attempts: ``attempts(body, carry, 0, max_steps, done=done)`` with
    ``carry = body(n, *carry)`` (default: a loop that reads ``done`` on the host before each
    attempt; a sampler's ``Context.steps`` captures one attempt, all six stages, as a CUDA graph).
    An attempt after every sample finished changes nothing.
    """
    if not callable(fn):
        raise TypeError(f"fn: must be callable as fn(y, t), got {type(fn).__name__}")
    _checks.check_float_tensor("y0", y0)
    _checks.check_batched("y0", y0)
    if q0 is not None:
        _checks.check_float_tensor("q0", q0)
        if q0.dtype != torch.float64 or q0.dim() != 2 or q0.shape[0] != y0.shape[0]:
            raise ValueError(f"q0: expected float64 [B={y0.shape[0]}, m], got {q0.dtype} {tuple(q0.shape)}")
    rtol, atol, max_steps = adaptive.check_options(rtol, atol, max_steps, error_norm)
    if h0 is not None:
        h0 = _checks.check_finite_scalar("h0", h0, positive=True)
    B = y0.shape[0]
    dev = y0.device
    shape = y0.shape
    t = torch.as_tensor(t0, dtype=torch.float64, device=dev).reshape(-1).expand(B).clone()
    t_end = torch.as_tensor(t1, dtype=torch.float64, device=dev).reshape(-1).expand(B)
    for name_, v in (("t0", t), ("t1", t_end)):
        if not _checks.is_capturing_or_compiling() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name_}: must be finite")
    direction = torch.sign(t_end - t)
    span = (t_end - t).abs()
    rows = y0.reshape(B, -1).contiguous()  # the state as [B, D] rows: fn sees views of x's shape
    numel = rows.shape[1] + (q0.shape[1] if q0 is not None else 0)
    combine = adaptive.Combos(COMBOS, rows, backend)
    name_b = combine.fused.name
    c_stage = torch.tensor(C, dtype=torch.float64, device=dev)
    q_weights = torch.tensor([B5, ERR], dtype=torch.float64, device=dev)  # [2, 7]: q_new - q, q's error

    # the stages whose dq takes part in nothing (zero weight in the solution and the error estimate)
    skipping = q0 is not None and skip_idle_quadrature
    idle = {i for i in range(7) if B5[i] == 0.0 and ERR[i] == 0.0} if skipping else set()
    flag = {"quadrature": True} if skipping else {}

    def evaluate(y: Tensor, t: Tensor, coefs=(), stage: int = 0) -> tuple[Tensor, Tensor | None]:
        if time_coefs is not None and not coefs:  # a single evaluation (not an attempt's stage)
            coefs = tuple(c[0] for c in time_coefs(t[None]))
        b = y.shape[0]
        if stage in idle:
            k = fn(y.view((b, *shape[1:])), t, *coefs, *live.rows, quadrature=False)[0]
            return k.reshape(b, -1).contiguous(), None
        out = fn(y.view((b, *shape[1:])), t, *coefs, *live.rows, **flag)
        k, g = out if q0 is not None else (out, None)
        return k.reshape(b, -1).contiguous(), g

    def sumsq(err, y, y_new, qerr=None, q=None, q_new=None) -> Tensor:
        """Per-sample sums of squares of the scaled error: one fused pass (``sf.ops.scaled_sumsq``)."""
        total = scaled_sumsq(err, y, y_new, rtol=rtol, atol=atol, mode="rk45", backend=name_b, trusted=True)
        if qerr is not None:
            total = total.double() + adaptive.tree_sum(adaptive.scaled(qerr, q, q_new, rtol, atol).square())
        return total

    for i, extra in enumerate(per_sample):
        if not isinstance(extra, Tensor) or extra.dim() < 1 or extra.shape[0] != B:
            raise ValueError(f"per_sample[{i}]: expected a tensor [B={B}, ...], got {getattr(extra, 'shape', extra)}")
    live = _Live(per_sample)
    k1, g1 = evaluate(rows, t)
    if h0 is None:
        h = _initial_step(evaluate, rows, k1, q0, g1, t, direction, span, sumsq, numel, error_norm)
    else:
        h = span * h0
    first_nfe = 1 if h0 is not None else 2
    # the step-size factor SAFETY * err^-1/5 within [MIN_FACTOR, MAX_FACTOR], or <= 1 after a
    # rejection, as bounds on err: factor = SAFETY * err.clamp(lo, E_MAX)^-1/5 (``sf.ops.step_control``)
    control = adaptive.Controller(
        t_end, direction, c_stage, combine, numel=numel, error_norm=error_norm, rule="rk45", safety=SAFETY,
        exponent=0.2, e_min_grow=(SAFETY / MAX_FACTOR) ** 5, e_min_retry=SAFETY**5, e_max=(SAFETY / MIN_FACTOR) ** 5,
    )  # fmt: skip
    live.control = control

    def attempt(n, y, k1, q, g1, state, stage_t, table):
        """One Dormand–Prince attempt for every sample (functional but for ``state``, ``stage_t`` and
        ``table``, updated in place by the controller; a trace may run it).

        ``state`` [9, B] is the controller's (``sf.ops.step_control``): a done sample has r = 0 and a
        zero step, so the attempt changes nothing for it.  The attempt's stage times ``stage_t`` [7, B]
        and coefficient table were made by the previous attempt's controller."""
        combine.table = table
        hs = state[adaptive.HS]
        ks, gs = [k1], [g1]
        tables = time_coefs(stage_t) if time_coefs is not None else ()
        for i in range(1, 7):
            y_new = combine(i, y, ks)  # after the last stage: the 5th-order solution (FSAL)
            k, g = evaluate(y_new, stage_t[i], tuple(c[i] for c in tables), i)
            ks.append(k)
            gs.append(torch.zeros_like(g1) if i in idle else g)  # an idle stage's weights are zero
        err = combine("err", ks[0], ks[1:])
        if q0 is not None:  # sum_j h w_j g_j for both weight rows at once, float64, fixed tree
            sums = adaptive.tree_sum(torch.stack(gs, -1)[:, :, None, :] * (hs[:, None, None, None] * q_weights))
            q_new, qerr = q + sums[..., 0], sums[..., 1]
            total = sumsq(err, y, y_new, qerr, q, q_new)
            y, k1, q, g1 = control(n, state, total, stage_t, table, [y_new, ks[6], q_new, gs[6]], [y, k1, q, g1])
        else:
            total = sumsq(err, y, y_new)
            y, k1 = control(n, state, total, stage_t, table, [y_new, ks[6]], [y, k1])
        return y, k1, q, g1, state, stage_t, table

    def done(carry) -> bool:  # one host read
        return not adaptive.running(carry[4][adaptive.R], carry[4][adaptive.FAIL])

    none = rows.new_zeros(B, 0, dtype=torch.float64)
    carry = (
        rows,
        k1,
        q0 if q0 is not None else none,
        g1 if g1 is not None else none,
        *control.start(span, h),
    )
    if attempts is None:
        retiring = retire and error_norm == "sample"
        attempts = _retiring_attempts(live, (0, 0, 0, 0, 1, 1, 1)) if retiring else _eager_attempts
    carry = attempts(attempt, carry, 0, max_steps, done=done)
    y, q, state = carry[0], carry[2], carry[4]
    r, h, fail = state[adaptive.R], state[adaptive.H], state[adaptive.FAIL]
    steps, rejected = state[adaptive.STEPS].long(), state[adaptive.REJECTED].long()
    t = torch.addcmul(t_end, direction, r, value=-1.0)
    adaptive.raise_failure(fail, name, t, ids=sample_ids)
    adaptive.raise_max_steps(name, r > 0, t, h, t_end, max_steps)
    nfe = first_nfe + 6 * (steps + rejected)
    return Solution(y.view(shape), nfe, steps, rejected, q if q0 is not None else None)


def _initial_step(evaluate, y0, k1, q0, g1, t, direction, span, sumsq, numel, mode):
    """Per-sample first step (Hairer, Norsett & Wanner, Solving ODEs I, II.4; scipy's rule), one NFE:
    h0 = 0.01 |y0| / |f0| in the scaled norm, then (0.01 / max(|f0|, |f1 - f0| / h0))^(1/5)."""
    zero = torch.zeros_like

    def norm(v, y, g=None):
        total = sumsq(v, zero(y0), y0) if q0 is None else sumsq(v, zero(y0), y0, g, zero(q0), q0)
        return adaptive.error_norm(total.double(), numel, mode)

    d0, d1 = norm(y0, y0, q0), norm(k1, y0, g1)
    h_a = torch.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1).minimum(span)
    hs = h_a * direction
    k2, g2 = evaluate(y0 + hs[:, None].to(y0.dtype) * k1, t + hs)
    d2 = norm(k2 - k1, y0, None if q0 is None else g2 - g1) / h_a
    big = torch.maximum(d1, d2)
    h_b = torch.where(big <= 1e-15, (h_a * 1e-3).clamp_min(1e-6), (0.01 / big) ** 0.2)
    h = torch.minimum(100 * h_a, h_b).minimum(span)
    # a non-finite trial (NaN/inf past the trial step, or in f0 itself): start small, and let the
    # attempts find (and report) where the values go bad
    return torch.where(torch.isfinite(h) & (h > 0), h, 0.01 * span)


# the combinations of an attempt: stage i's state y + h sum_j A[i][j] k_j, and the error estimate
# h sum_j ERR[j] k_j (its first input is k_1); weights (const, mult) of const + mult * h
COMBOS = {i: ((1.0, 0.0), *((0.0, a) for a in A[i])) for i in range(1, 7)}
COMBOS["err"] = tuple((0.0, e) for e in ERR)
