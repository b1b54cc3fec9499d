"""Reverse diffusion (score_sde's ReverseDiffusionPredictor): x_mean = x - f + G^2 s, x = x_mean + G z.

(f, G) is the SDE's forward discretisation between t_n and t_{n+1} (t_N = 0): score_sde's tables
on its own grid, the exact transition elsewhere; f = f_coef x, so a step is one fused pass.  The
last step returns x_mean.
"""

from __future__ import annotations

from .base import Context

NAME = "reverse_diffusion"
DRAWS = 1
DEFAULT_STEPS = 1000
KIND = "sde"


def schedule(ctx: Context) -> list[tuple[float, float, float]]:
    """Per step (x coefficient 1 - f_coef, score coefficient G^2, noise std G), once per run."""
    times, next_times = ctx.schedule_times()
    f_coef, G = ctx.sde.discretize_coefs(times, next_times, score_sde_tables=ctx.score_sde_tables)
    return list(zip((1 - f_coef).tolist(), (G * G).tolist(), G.tolist()))


def predictor_step(ctx: Context, sched, x, s, n: int, j: int, last: bool):
    x_coef, s_coef, noise = sched[n]
    return ctx.update(x, [(s_coef, s)], x_coef=x_coef, noise=0.0 if last else noise, n=n, j=j)


def run(ctx: Context, x, *, denoise: bool = True):
    sched = schedule(ctx)
    times = ctx.times.tolist()
    for n, t in enumerate(times):
        x = predictor_step(ctx, sched, x, ctx.score(x, t), n, 0, last=denoise and n == len(times) - 1)
        x = ctx.step_done(n, x, t)
    return x
