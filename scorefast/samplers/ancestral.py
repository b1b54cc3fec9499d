"""Ancestral sampling (score_sde's AncestralSamplingPredictor), VE and VP-type SDEs.

VE: x_mean = x + (sigma^2 - sigma_next^2) s; noise std sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2).
VP: x_mean = (x + beta s) / sqrt(1 - beta); noise std sqrt(beta); beta from score_sde's table on its
grid, else 1 - abar(t)/abar(t_next).  The last step returns x_mean.
"""

from __future__ import annotations

import torch

from ..sde import EDM, VESDE, VPSDE, DiscreteVP, SubVPSDE
from .base import Context, StepTable, denoise_only
from .euler_maruyama import predictor_step, run_predictor

NAME = "ancestral"
DRAWS = 1
DEFAULT_STEPS = 1000
KIND = "sde"


def schedule(ctx: Context) -> StepTable:
    """Per step (x coefficient, score coefficient, noise std), once per run."""
    sde = ctx.sde
    times, _ = ctx.schedule_times()
    if isinstance(sde, VESDE | EDM):
        if ctx.score_sde_tables and isinstance(sde, VESDE):
            i = sde.table_index(times)
            sigma = sde.discrete_sigmas[i]
            adj = torch.where(i == 0, torch.zeros_like(sigma), sde.discrete_sigmas[(i - 1).clamp_min(0)])
        else:
            sigma, adj = sde.std(times), ctx.next_coefs()[1]
        var = sigma**2 - adj**2
        return ctx.table(torch.stack([torch.ones_like(var), var, torch.sqrt(adj**2 * var / sigma**2)], 1))
    if ctx.score_sde_tables:
        beta = sde.discrete_betas[sde.table_index(times)]
    else:
        beta = 1 - sde.alpha_bar(times) / ctx.next_coefs()[0] ** 2
    inv = 1 / torch.sqrt(1 - beta)
    return ctx.table(torch.stack([inv, beta * inv, beta.sqrt()], 1))


def validate(sde, *, denoise) -> dict:
    if isinstance(sde, SubVPSDE) or not isinstance(sde, VESDE | EDM | VPSDE | DiscreteVP):
        raise ValueError(f"sampler: ancestral supports VESDE, EDM, VPSDE and DiscreteVP, not {type(sde).__name__}")
    return denoise_only(sde, denoise=denoise)


def run(ctx: Context, x, *, denoise: bool = True):
    return run_predictor(ctx, x, schedule(ctx), predictor_step, denoise)
