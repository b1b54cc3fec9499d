"""Euler–Maruyama on the reverse SDE (score_sde's EulerMaruyamaPredictor).

Step n from t_n: x_mean = x + (f - g^2 s) dt, x = x_mean + g sqrt(|dt|) z, with dt = t_{n+1} - t_n
(t_N = 0, the data end); on score_sde's own grid dt = -T/N.  The last step returns x_mean.  The
reverse drift is a x + b s, so a step is one fused pass: (1 + a dt) x + (b dt) s + g sqrt|dt| z.
"""

from __future__ import annotations

import torch

from .base import Context, Step, StepTable, denoise_only

NAME = "euler_maruyama"
DRAWS = 1
DEFAULT_STEPS = 1000
KIND = "sde"
validate = denoise_only


def schedule(ctx: Context) -> StepTable:
    """Per step (x coefficient, score coefficient, noise std), computed once per run."""
    times, next_times = ctx.schedule_times()
    dt = (next_times - times) if not ctx.score_sde_tables else times.new_full(times.shape, -ctx.sde.T / ctx.sde.N)
    a, b = ctx.sde.reverse_coefs(times)
    g = ctx.sde.diffusion(times)
    return ctx.table(torch.stack([1 + a * dt, b * dt, g * dt.abs().sqrt()], 1))


def predictor_step(ctx: Context, sched: StepTable, x, s, n: Step, j: int, last: bool):
    """One launch: (x coefficient, score coefficient, noise std) of row n, read by the kernel."""
    return ctx.update_row(x, sched, n, [s], j=j, noise=not last)


def run(ctx: Context, x, *, denoise: bool = True):
    return run_predictor(ctx, x, schedule(ctx), predictor_step, denoise)


def run_predictor(ctx: Context, x, sched: StepTable, predictor, denoise: bool):
    """The predictor-only loop shared with reverse_diffusion: N steps, the last one returns the mean."""
    N = len(ctx.times)

    def step(n: Step, x, last: bool = False):
        t = ctx.time(n)
        x = predictor(ctx, sched, x, ctx.score(x, t), n, 0, last)
        return ctx.step_done(n, x, t)

    x = ctx.steps(step, x, 0, N - 1)
    return step(N - 1, x, last=denoise)
