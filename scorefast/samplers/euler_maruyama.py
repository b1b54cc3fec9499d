"""Euler–Maruyama on the reverse SDE (score_sde's EulerMaruyamaPredictor).

Step n from t_n: x_mean = x + (f - g^2 s) dt, x = x_mean + g sqrt(|dt|) z, with dt = t_{n+1} - t_n
(t_N = 0, the data end); on score_sde's own grid dt = -T/N.  The last step returns x_mean.  The
reverse drift is a x + b s, so a step is one fused pass: (1 + a dt) x + (b dt) s + g sqrt|dt| z.
"""

from __future__ import annotations

from .base import Context

NAME = "euler_maruyama"
DRAWS = 1
DEFAULT_STEPS = 1000
KIND = "sde"


def schedule(ctx: Context) -> list[tuple[float, float, float]]:
    """Per step (x coefficient, score coefficient, noise std), computed once per run."""
    times, next_times = ctx.schedule_times()
    dt = (next_times - times) if not ctx.score_sde_tables else times.new_full(times.shape, -ctx.sde.T / ctx.sde.N)
    a, b = ctx.sde.reverse_coefs(times)
    g = ctx.sde.diffusion(times)
    return list(zip((1 + a * dt).tolist(), (b * dt).tolist(), (g * dt.abs().sqrt()).tolist()))


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
