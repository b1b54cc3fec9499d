"""Adaptive Dormand–Prince on the probability-flow ODE from T to eps, then the Tweedie step.

Each sample has its own time and step size (``scorefast.solvers.rk45``); ``steps`` is ignored.
The drift a(t) x + b(t) s is one fused pass per stage.  Options: ``rtol``, ``atol``,
``error_norm`` ("sample": batch-invariant, or "batch": one norm over the batch as scipy),
``max_steps`` (attempts before ``SolverError``).  A non-finite score ends the run with
``NonFiniteError`` at the first bad attempt.  info reports ``nfe_per_sample``.
"""

from __future__ import annotations

import torch

from .._checks import check_bool, state_dtype
from ..solvers import adaptive
from ..solvers import rk45 as solver
from .base import Context, affine_coefs_at
from .ode_euler import tweedie

NAME = "rk45"
DRAWS = 1
DEFAULT_STEPS = 2
KIND = "ode"


def validate(sde, *, rtol, atol, denoise, error_norm, max_steps) -> dict:
    rtol, atol, max_steps = adaptive.check_options(rtol, atol, max_steps, error_norm)
    return {
        "rtol": rtol,
        "atol": atol,
        "denoise": check_bool("denoise", denoise),
        "error_norm": error_norm,
        "max_steps": max_steps,
    }


def run(
    ctx: Context,
    x,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    denoise: bool = True,
    error_norm: str = "sample",
    max_steps: int = 100_000,
):
    sde = ctx.sde

    dt = state_dtype(x)
    B = x.shape[0]
    fused = adaptive.FusedRows(x.reshape(B, -1), ctx.backend)
    zeros = {}  # the drift's noise coefficient row (none is drawn), one per stage count
    fn, folded = ctx.score_fn, ctx._affine(x)  # an adapter's affine form is folded into the table

    def coefs(t):
        """The drift a(t) x + b(t) s and the network's time input at all stage times of an attempt
        at once ([S, B] times): one coefficient table [S, 3, B] (a, b, 0; in the update's arithmetic
        dtype, one rounding as before) and the times in x's dtype (rows of the same table for fp32).
        An adapter (score = a' x + b' out) folds in: (a + b a') x + (b b') out, its network's time
        input ``net_time(t)``, so the network's own output is read once, by the fused pass."""
        a, b = sde.reverse_coefs(t, probability_flow=True)
        if folded:
            a2, b2 = affine_coefs_at(fn, t)
            a, b = torch.addcmul(a, b, a2), b * b2
            return torch.stack([a, b, _zero(t)], 1).to(dt), fn.net_time(t).to(x.dtype)
        zero = _zero(t)
        if x.dtype == dt:
            table = torch.stack([a, b, zero, t], 1).to(dt)
            return table[:, :3], table[:, 3]
        return torch.stack([a, b, zero], 1).to(dt), t.to(x.dtype)

    def _zero(t):
        """A float64 zero row of t's shape (made once per shape)."""
        zero = zeros.get(t.shape)
        if zero is None:
            zero = zeros[t.shape] = torch.zeros(t.shape, dtype=torch.float64, device=t.device)
        return zero

    def drift(y, t, coef, t_in):
        s = ctx._network(fn.net, y, t_in) if folded else ctx.score(y, t, t_in=t_in)
        return fused(y.reshape(B, -1), [s.reshape(B, -1)], coef).view(y.shape)

    t0, t1 = float(ctx.times[0]), float(ctx.times[-1])  # T -> eps on the default grids
    sol = solver.solve(
        drift,
        x,
        t0,
        t1,
        rtol=rtol,
        atol=atol,
        backend=ctx.backend,
        attempts=ctx.steps,
        error_norm=error_norm,
        max_steps=max_steps,
        time_coefs=coefs,
    )
    ctx.per_sample_nfe = sol.nfe + (1 if denoise else 0)
    ctx.step_done(0, sol.y, ctx.t_vec(t1, x))
    return tweedie(ctx, sol.y, denoise)
