"""Euler on the probability-flow ODE dx/dt = f - g^2 s / 2 over the N-1 grid intervals, then Tweedie."""

from __future__ import annotations

import torch

from .base import Context, Step, denoise_only

NAME = "ode_euler"
DRAWS = 1
DEFAULT_STEPS = 100
KIND = "ode"
validate = denoise_only


def run(ctx: Context, x, *, denoise: bool = True):
    times = ctx.times.to("cpu", torch.float64)
    dt = times[1:] - times[:-1]
    a, b = ctx.sde.reverse_coefs(times[:-1], probability_flow=True)
    sched = ctx.table(torch.stack([1 + a * dt, b * dt], 1))

    def step(n: Step, x):
        t = ctx.time(n)
        x = ctx.update_row(x, sched, n, [ctx.score(x, t)], cols=(0, 1, 0.0), noise=False)
        return ctx.step_done(n, x, t)

    return tweedie(ctx, ctx.steps(step, x, 0, len(times) - 1), denoise)


def tweedie(ctx: Context, x, denoise: bool):
    """The ODE samplers' last step at eps: x0 = (x + std^2 s) / mean_coef (one NFE)."""
    if not denoise:
        return x
    n = len(ctx.times) - 1
    t = ctx.time(n)
    x0 = ctx.denoised(x, n, ctx.score(x, t))
    return ctx.step_done(n, x0, t, x0)
