"""Reverse diffusion (score_sde's ReverseDiffusionPredictor): x_mean = x - f + G^2 s, x = x_mean + G z.

(f, G) is the SDE's forward discretisation between t_n and t_{n+1} (t_N = 0): score_sde's tables
on its own grid, the exact transition elsewhere; f = f_coef x, so a step is one fused pass.  The
last step returns x_mean.
"""

from __future__ import annotations

import torch

from .base import Context, StepTable, denoise_only
from .euler_maruyama import predictor_step, run_predictor

NAME = "reverse_diffusion"
DRAWS = 1
DEFAULT_STEPS = 1000
KIND = "sde"
validate = denoise_only


def schedule(ctx: Context) -> StepTable:
    """Per step (x coefficient 1 - f_coef, score coefficient G^2, noise std G), once per run."""
    times, next_times = ctx.schedule_times()
    f_coef, G = ctx.sde.discretize_coefs(times, next_times, score_sde_tables=ctx.score_sde_tables)
    if not ctx.score_sde_tables:  # the last step's exact transition to the data end (a = 1, s = 0), on
        # every SDE: DiscreteVP's t_N = 0 is its least noisy table entry, not the data end
        a, s = ctx.sde.mean_coef(times[-1:]), ctx.sde.std(times[-1:])
        f_coef, G = f_coef.clone(), G.clone()
        f_coef[-1], G[-1] = a[0] - 1, s[0]
    return ctx.table(torch.stack([1 - f_coef, G * G, G], 1))


def run(ctx: Context, x, *, denoise: bool = True):
    return run_predictor(ctx, x, schedule(ctx), predictor_step, denoise)
