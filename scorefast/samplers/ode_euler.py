"""Euler on the probability-flow ODE dx/dt = f - g^2 s / 2 over the N-1 grid intervals, then Tweedie."""

from __future__ import annotations

from .base import Context

NAME = "ode_euler"
DRAWS = 1
DEFAULT_STEPS = 100
KIND = "ode"


def run(ctx: Context, x, *, denoise: bool = True):
    times = ctx.times
    for n in range(len(times) - 1):
        t = ctx.t_vec(times[n], x)
        s = ctx.score(x, t)
        dt = float(times[n + 1] - times[n])
        x = ctx.update(x, [(dt, ctx.sde.reverse_drift(x, t, s, probability_flow=True))], n=n)
        ctx.step_done(n, x, t)
    return tweedie(ctx, x, denoise)


def tweedie(ctx: Context, x, denoise: bool):
    """The ODE samplers' last step at eps: x0 = (x + std^2 s) / mean_coef (one NFE)."""
    if not denoise:
        return x
    t = ctx.t_vec(ctx.times[-1], x)
    x0 = ctx.denoised(x, t, ctx.score(x, t))
    ctx.step_done(len(ctx.times) - 1, x0, t, x0)
    return x0
