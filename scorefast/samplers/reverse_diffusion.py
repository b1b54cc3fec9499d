"""Reverse diffusion (score_sde's ReverseDiffusionPredictor): x_mean = x - f + G^2 s, x = x_mean + G z.

(f, G) is the SDE's forward discretisation between t_n and t_{n+1} (t_N = 0): score_sde's tables
on its own grid, the exact transition elsewhere.  The last step returns x_mean.
"""

from __future__ import annotations

from .base import Context

NAME = "reverse_diffusion"
DRAWS = 1
DEFAULT_STEPS = 1000
KIND = "sde"


def next_time(ctx: Context, n: int, x):
    times = ctx.times
    return ctx.t_vec(times[n + 1] if n + 1 < len(times) else 0.0, x)


def predictor_step(ctx: Context, x, t, s, n: int, j: int, last: bool):
    f, G = ctx.sde.discretize(x, t, next_time(ctx, n, x), score_sde_tables=ctx.score_sde_tables)
    return ctx.update(x, [(-1.0, f), (G * G, s)], noise=0.0 if last else G, n=n, j=j)


def run(ctx: Context, x, *, denoise: bool = True):
    N = len(ctx.times)
    for n in range(N):
        t = ctx.t_vec(ctx.times[n], x)
        s = ctx.score(x, t)
        x = predictor_step(ctx, x, t, s, n, 0, last=denoise and n == N - 1)
        ctx.step_done(n, x, t)
    return x
