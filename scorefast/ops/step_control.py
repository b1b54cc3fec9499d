"""``scorefast::step_control``: the per-sample step controller of one adaptive-solver attempt.

An attempt of rk45 or adaptive_sde ends with one launch of this op: from each sample's sum of squares
of its scaled error it decides acceptance, advances the remaining time, counts accepted and rejected
steps, applies the step-size rule and records a failure, then makes what the next attempt reads: the
clamped step, its signed form, the attempt's start time, the stage times and the attempt's
coefficient table.  So an attempt needs no tensor arithmetic of its own around its fused passes.

The solver state is one float64 tensor ``state`` [9, B] updated in place, rows ``ROWS``:
r (time left to t_end, 0 when done), h (next step, clamped to r), steps, rejected (counts),
retry (1 after a rejection), fail (-1, or the attempt n of a non-finite error, n + 1/2 for a step
that underflowed), hs (signed step), t (the attempt's start time), active (r > 0).

Arithmetic per sample (float64, ``step_control_ref``), with err = sqrt(sumsq / numel) (or one RMS over
the batch, ``batch_norm``), accept = active & (err <= 1) (NaN compares False), down = active ^ accept:
- rule "rk45": h *= safety * clamp(err, e_min_retry if retry | down else e_min_grow, e_max) ** -exponent
  (the two floors rounded to float32, as the solver's original torch code made them)
- rule "sde" (adaptive_sde): h = safety * h * max(err, 1e-10) ** -exponent
then the next attempt: active = r > 0, h = min(h, r), hs = h * direction, t = t_end - direction * r
("rk45"; "sde": hs = h, t = r + t_end), stage_t[s] = t + c_stage[s] * hs and
table[k] = base[k] + mult[k] * hs (cast to the table's dtype).  ``advance=False`` makes only the
next attempt's values (the state before the first attempt).  Powers use one rounding path for every
sample (libm's pow on the CPU), so a sample's steps do not depend on the batch (DESIGN.md).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _checks, backends

ROWS = ("r", "h", "steps", "rejected", "retry", "fail", "hs", "t", "active")
R, H, STEPS, REJECTED, RETRY, FAIL, HS, T, ACTIVE = range(len(ROWS))
RULES = ("rk45", "sde")


@torch.library.custom_op("scorefast::step_control", mutates_args=("state", "stage_t", "table"))
def step_control_op(
    state: Tensor,
    sumsq: Tensor | None,
    t_end: Tensor,
    direction: Tensor,
    n: Tensor,
    c_stage: Tensor,
    stage_t: Tensor,
    base: Tensor,
    mult: Tensor,
    table: Tensor,
    numel: int,
    batch_norm: bool,
    rule: str,
    safety: float,
    exponent: float,
    e_min_grow: float,
    e_min_retry: float,
    e_max: float,
    advance: bool,
    backend: str,
) -> Tensor:
    """Updates ``state`` [9, B], ``stage_t`` [S, B] and ``table`` [R, B] in place; returns accept [B] bool."""
    accept = torch.empty(state.shape[1], dtype=torch.bool, device=state.device)
    backends.get(backend).step_control(
        accept, state, sumsq, t_end, direction, n, c_stage, stage_t, base, mult, table,
        numel, batch_norm, rule, safety, exponent, e_min_grow, e_min_retry, e_max, advance,
    )  # fmt: skip
    return accept


@step_control_op.register_fake
def _(state, sumsq, t_end, direction, n, c_stage, stage_t, base, mult, table, *args):
    return state.new_empty(state.shape[1], dtype=torch.bool)


def libm_pow(x: Tensor, p: float) -> Tensor:
    """x ** p with one rounding path for every element: torch's contiguous CPU pow rounds its vector
    body (Sleef) and its scalar tail (libm) differently, so a strided view (scalar loop) is used."""
    return torch.stack([x, x], -1)[..., 0].pow(p)


def step_control_ref(
    accept, state, sumsq, t_end, direction, n, c_stage, stage_t, base, mult, table,
    numel, batch_norm, rule, safety, exponent, e_min_grow, e_min_retry, e_max, advance,
) -> None:  # fmt: skip
    """The readable reference (the torch backend): see the module docstring."""
    r, h, steps, rejected, retry, fail = state[R], state[H], state[STEPS], state[REJECTED], state[RETRY], state[FAIL]
    if advance:
        sumsq = sumsq.double()
        err = (sumsq.sum() / (sumsq.shape[0] * numel)).sqrt().expand_as(r) if batch_norm else (sumsq / numel).sqrt()
        active = state[ACTIVE] != 0
        ok = active & (err <= 1.0)
        down = active ^ ok
        r.copy_(torch.where(ok, r - h, r))
        steps.add_(ok)
        rejected.add_(down)
        if rule == "rk45":
            floor = torch.where((retry != 0) | down, e_min_retry, e_min_grow)  # float32 floors (as before)
            new_h = h * (safety * libm_pow(torch.maximum(err, floor).clamp_max(e_max), -exponent))
        else:
            new_h = safety * h * libm_pow(err.clamp_min(1e-10), -exponent)
        nonfinite = ~torch.isfinite(err)
        stuck = down & (new_h <= 8 * torch.finfo(torch.float64).eps * state[T].abs()) & ~nonfinite
        failed = torch.where(stuck, 0.5, 0.0).double() + n
        fail.copy_(torch.where((nonfinite | stuck) & (fail < 0), failed, fail))
        h.copy_(new_h)
        retry.copy_(down)
        accept.copy_(ok)
    else:
        accept.fill_(False)
    state[ACTIVE].copy_(r > 0)
    h.copy_(torch.minimum(h, r))
    if rule == "rk45":
        state[HS].copy_(h * direction)
        state[T].copy_(torch.addcmul(t_end, direction, r, value=-1.0))
    else:
        state[HS].copy_(h)
        state[T].copy_(r + t_end)
    hs = state[HS]
    stage_t.copy_(torch.addcmul(state[T], c_stage[:, None], hs))
    table.copy_(torch.addcmul(base[:, None], mult[:, None], hs[None, :]).to(table.dtype))


def _check(state, sumsq, t_end, direction, n, c_stage, stage_t, base, mult, table, numel, rule, advance) -> None:
    """Argument validation (ValueError/TypeError naming the argument)."""
    if not isinstance(state, Tensor) or state.dtype != torch.float64 or state.dim() != 2 or state.shape[0] != len(ROWS):
        raise ValueError(f"state: expected float64 [{len(ROWS)}, B], got {getattr(state, 'shape', type(state))}")
    B, dev = state.shape[1], state.device
    wanted = {"t_end": (t_end, (B,)), "direction": (direction, (B,)), "c_stage": (c_stage, (c_stage.numel(),)),
              "stage_t": (stage_t, (c_stage.numel(), B)), "base": (base, (base.numel(),)),
              "mult": (mult, (base.numel(),))}  # fmt: skip
    for name, (t, shape) in wanted.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dtype != torch.float64 or tuple(t.shape) != shape or t.device != dev or not t.is_contiguous():
            raise ValueError(
                f"{name}: expected contiguous float64 {list(shape)} on {dev}, got {t.dtype} {list(t.shape)}"
            )
    if advance or sumsq is not None:
        if not isinstance(sumsq, Tensor) or sumsq.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"sumsq: expected a float32/float64 tensor, got {getattr(sumsq, 'dtype', type(sumsq))}")
        if tuple(sumsq.shape) != (B,) or sumsq.device != dev or not sumsq.is_contiguous():
            raise ValueError(f"sumsq: expected contiguous [{B}] on {dev}, got {list(sumsq.shape)}")
    if not isinstance(table, Tensor) or table.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"table: expected a float32/float64 tensor, got {getattr(table, 'dtype', type(table))}")
    if tuple(table.shape) != (base.numel(), B) or table.device != dev or not table.is_contiguous():
        raise ValueError(f"table: expected contiguous [{base.numel()}, {B}] on {dev}, got {list(table.shape)}")
    if isinstance(n, bool) or not (
        isinstance(n, int) or (isinstance(n, Tensor) and n.dtype == torch.int64 and n.dim() == 0)
    ):
        raise TypeError(f"n: expected an int or a 0-d int64 tensor (the attempt counter), got {n!r}")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 1:
        raise ValueError(f"numel: must be an int >= 1, got {numel!r}")
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")


def step_control(
    state: Tensor,
    sumsq: Tensor | None,
    t_end: Tensor,
    direction: Tensor,
    n: Tensor | int,
    c_stage: Tensor,
    stage_t: Tensor,
    base: Tensor,
    mult: Tensor,
    table: Tensor,
    *,
    numel: int,
    batch_norm: bool = False,
    rule: str = "rk45",
    safety: float = 0.9,
    exponent: float = 0.2,
    e_min_grow: float = 0.0,
    e_min_retry: float = 0.0,
    e_max: float = math.inf,
    advance: bool = True,
    backend: str | None = None,
    trusted: bool = False,
) -> Tensor:
    """One controller launch (see the module docstring); returns accept [B] bool.  ``trusted``: the
    solvers' per-attempt call (arguments checked once per run; ``backend`` a resolved name)."""
    if not trusted:
        _check(state, sumsq, t_end, direction, n, c_stage, stage_t, base, mult, table, numel, rule, advance)
        for name, v in (("safety", safety), ("exponent", exponent), ("e_max", e_max)):
            if not isinstance(v, int | float) or math.isnan(v) or v <= 0:
                raise ValueError(f"{name}: must be a positive number, got {v!r}")
        backend = backends.resolve(backend, state.device)
    args = (
        state,
        sumsq,
        t_end,
        direction,
        n,
        c_stage,
        stage_t,
        base,
        mult,
        table,
        numel,
        bool(batch_norm),
        rule,
        float(safety),
        float(exponent),
        float(e_min_grow),
        float(e_min_retry),
        float(e_max),
        bool(advance),
    )
    if _checks.use_custom_op(state):
        if not isinstance(n, Tensor):
            args = (*args[:4], torch.tensor(n, dtype=torch.int64, device=state.device), *args[5:])
        return step_control_op(*args, backend)
    accept = torch.empty(state.shape[1], dtype=torch.bool, device=state.device)
    backends.get(backend).step_control(accept, *args)
    return accept
