"""Euler on the probability-flow ODE dx/dt = f - g^2 s / 2 over the N-1 grid intervals, then Tweedie."""

from __future__ import annotations

from .base import Context

NAME = "ode_euler"
DRAWS = 1
DEFAULT_STEPS = 100
KIND = "ode"


def run(ctx: Context, x, *, denoise: bool = True):
    times = ctx.times.to("cpu", ctx.times.dtype)
    dt = times[1:] - times[:-1]
    a, b = ctx.sde.reverse_coefs(times[:-1], probability_flow=True)
    sched = list(zip((1 + a * dt).tolist(), (b * dt).tolist()))
    for n, t in enumerate(times[:-1].tolist()):
        x_coef, s_coef = sched[n]
        x = ctx.update(x, [(s_coef, ctx.score(x, t))], x_coef=x_coef, n=n)
        x = ctx.step_done(n, x, t)
    return tweedie(ctx, x, denoise)


def tweedie(ctx: Context, x, denoise: bool):
    """The ODE samplers' last step at eps: x0 = (x + std^2 s) / mean_coef (one NFE)."""
    if not denoise:
        return x
    t = float(ctx.times[-1])
    x0 = ctx.denoised(x, t, ctx.score(x, t))
    return ctx.step_done(len(ctx.times) - 1, x0, t, x0)
