"""Ancestral sampling (score_sde's AncestralSamplingPredictor), VE and VP-type SDEs.

VE: x_mean = x + (sigma^2 - sigma_next^2) s; noise std sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2).
VP: x_mean = (x + beta s) / sqrt(1 - beta); noise std sqrt(beta); beta from score_sde's table on its
grid, else 1 - abar(t)/abar(t_next).  The last step returns x_mean.
"""

from __future__ import annotations

import torch

from ..sde import EDM, VESDE, VPSDE, DiscreteVP, SubVPSDE
from .base import Context
from .reverse_diffusion import next_time

NAME = "ancestral"
DRAWS = 1
DEFAULT_STEPS = 1000
KIND = "sde"


def _sigmas(ctx: Context, t, t_next):
    sde = ctx.sde
    if ctx.score_sde_tables and isinstance(sde, VESDE):
        i = sde.table_index(t)
        table = sde.discrete_sigmas.to(t.device)
        return table[i], torch.where(i == 0, torch.zeros_like(t), table[(i - 1).clamp_min(0)])
    return sde.std(t), torch.where(t_next > 0, sde.std(t_next), torch.zeros_like(t_next))


def run(ctx: Context, x, *, denoise: bool = True):
    sde = ctx.sde
    if isinstance(sde, SubVPSDE) or not isinstance(sde, VESDE | EDM | VPSDE | DiscreteVP):
        raise ValueError(f"sampler: ancestral supports VESDE, EDM, VPSDE and DiscreteVP, not {type(sde).__name__}")
    ve = isinstance(sde, VESDE | EDM)
    N = len(ctx.times)
    for n in range(N):
        t = ctx.t_vec(ctx.times[n], x)
        t_next = next_time(ctx, n, x)
        s = ctx.score(x, t)
        last = denoise and n == N - 1
        if ve:
            sigma, adj = _sigmas(ctx, t, t_next)
            var = sigma**2 - adj**2
            std = torch.sqrt(adj**2 * var / sigma**2)
            x = ctx.update(x, [(var.to(x.dtype), s)], noise=0.0 if last else std.to(x.dtype), n=n)
        else:
            if ctx.score_sde_tables:
                beta = sde.discrete_betas[sde.table_index(t).cpu()].to(x.device)
            else:
                beta = 1 - sde.alpha_bar(t) / sde.alpha_bar(t_next)
            inv = 1 / torch.sqrt(1 - beta)
            x = ctx.update(
                x,
                [((beta * inv).to(x.dtype), s)],
                x_coef=inv.to(x.dtype),
                noise=0.0 if last else beta.sqrt().to(x.dtype),
                n=n,
            )
        ctx.step_done(n, x, t)
    return x
