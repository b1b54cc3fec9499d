"""Adaptive Dormand–Prince on the probability-flow ODE from T to eps, then the Tweedie step.

Each sample has its own time and step size (``scorefast.solvers.rk45``); ``steps`` is ignored.
info reports ``nfe_per_sample``.
"""

from __future__ import annotations

from .._checks import check_bool, check_finite_scalar
from ..solvers import rk45 as solver
from .base import Context
from .ode_euler import tweedie

NAME = "rk45"
DRAWS = 1
DEFAULT_STEPS = 2
KIND = "ode"


def validate(sde, *, rtol, atol, denoise) -> dict:
    return {
        "rtol": check_finite_scalar("rtol", rtol, positive=True),
        "atol": check_finite_scalar("atol", atol, positive=True),
        "denoise": check_bool("denoise", denoise),
    }


def run(ctx: Context, x, *, rtol: float = 1e-5, atol: float = 1e-5, denoise: bool = True):
    sde = ctx.sde

    def drift(y, t):
        return sde.reverse_drift(y, t, ctx.score(y, t), probability_flow=True)

    t0 = float(ctx.times[0])
    sol = solver.solve(drift, x, t0, sde.eps, rtol=rtol, atol=atol, backend=ctx.backend, attempts=ctx.steps)
    ctx.per_sample_nfe = sol.nfe + (1 if denoise else 0)
    ctx.step_done(0, sol.y, ctx.t_vec(sde.eps, x))
    return tweedie(ctx, sol.y, denoise)
