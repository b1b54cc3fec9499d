"""Euler–Maruyama on the reverse SDE (score_sde's EulerMaruyamaPredictor).

Step n from t_n: x_mean = x + (f - g^2 s) dt, x = x_mean + g sqrt(|dt|) z, with dt = t_{n+1} - t_n
(t_N = 0, the data end); on score_sde's own grid dt = -T/N.  The last step returns x_mean.
"""

from __future__ import annotations

from .base import Context

NAME = "euler_maruyama"
DRAWS = 1
DEFAULT_STEPS = 1000
KIND = "sde"


def step_sizes(ctx: Context, n: int) -> float:
    if ctx.score_sde_tables:
        return -ctx.sde.T / ctx.sde.N
    times = ctx.times
    t_next = float(times[n + 1]) if n + 1 < len(times) else 0.0
    return t_next - float(times[n])


def predictor_step(ctx: Context, x, t, s, n: int, j: int, last: bool):
    dt = step_sizes(ctx, n)
    g = ctx.sde.diffusion(t).to(x.dtype)
    return ctx.update(x, [(dt, ctx.sde.reverse_drift(x, t, s))], noise=0.0 if last else g * abs(dt) ** 0.5, n=n, j=j)


def run(ctx: Context, x, *, denoise: bool = True):
    N = len(ctx.times)
    for n in range(N):
        t = ctx.t_vec(ctx.times[n], x)
        x = predictor_step(ctx, x, t, ctx.score(x, t), n, 0, last=denoise and n == N - 1)
        ctx.step_done(n, x, t)
    return x
