"""Ancestral sampling (score_sde's AncestralSamplingPredictor) on VE and VP-type SDEs, and the exact
posterior step on any other SDE with affine marginals (RectifiedFlow).

VE: x_mean = x + (sigma^2 - sigma_next^2) s; noise std sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2).
VP: x_mean = (x + beta s) / sqrt(1 - beta); noise std sqrt(beta); beta from score_sde's table on its
grid, else 1 - abar(t)/abar(t_next).
Other SDEs: with the exact forward transition x_t = c x_next + G z (``SDE.exact_transition``),
x_mean = (x + G^2 s) / c = E[x_next | x_t] and noise std G s(t_next) / s(t) (DDPM's posterior, i.e.
DDIM with eta = 1; the VE rule above is this rule with c = 1).  score_sde has no sub-VP ancestral
sampler, and neither has this module.  The last step returns x_mean.
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
    times, next_times = ctx.schedule_times()
    if isinstance(sde, VESDE | EDM):
        if ctx.score_sde_tables and isinstance(sde, VESDE):
            i = sde.table_index(times)
            sigma = sde.discrete_sigmas[i]
            adj = torch.where(i == 0, torch.zeros_like(sigma), sde.discrete_sigmas[(i - 1).clamp_min(0)])
        else:
            sigma, adj = sde.std(times), ctx.next_coefs()[1]
        var = sigma**2 - adj**2
        return ctx.table(torch.stack([torch.ones_like(var), var, torch.sqrt(adj**2 * var / sigma**2)], 1))
    if not isinstance(sde, VPSDE | DiscreteVP):  # the exact posterior through the SDE's own transition
        c_minus_1, G = sde.exact_transition(times, next_times)
        s_next = ctx.next_coefs()[1]  # 0 at the data end
        c = c_minus_1 + 1
        return ctx.table(torch.stack([1 / c, G * G / c, G * s_next / sde.std(times)], 1))
    if ctx.score_sde_tables:
        beta = sde.discrete_betas[sde.table_index(times)]
    else:
        beta = 1 - sde.alpha_bar(times) / ctx.next_coefs()[0] ** 2
    inv = 1 / torch.sqrt(1 - beta)
    return ctx.table(torch.stack([inv, beta * inv, beta.sqrt()], 1))


def validate(sde, *, denoise) -> dict:
    if isinstance(sde, SubVPSDE):
        raise ValueError("sampler: ancestral has no sub-VP form (score_sde has none); use reverse_diffusion or ddim")
    return denoise_only(sde, denoise=denoise)


def run(ctx: Context, x, *, denoise: bool = True):
    return run_predictor(ctx, x, schedule(ctx), predictor_step, denoise)
