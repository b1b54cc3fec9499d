"""Predictor–corrector (score_sde's pc_sampler): per grid time, n_corrector Langevin corrector steps
(``sf.ops.snr_langevin_step``, snr 0.16) then one predictor step.

The corrector's alpha is score_sde's ``alphas[floor(t (N-1)/T)]`` for VP on its own grid,
abar(t_n)/abar(t_{n+1}) elsewhere and for sub-VP (t_N = 0), and 1 for VE/EDM.  Draws per step:
n_corrector + 1 (correctors first, then the predictor).
"""

from __future__ import annotations

import torch

from ..ops import snr_langevin_step
from ..rng import STREAM_SAMPLER
from ..sde import VPSDE, DiscreteVP
from . import euler_maruyama, reverse_diffusion
from .base import Context

NAME = "pc"
DEFAULT_STEPS = 1000
KIND = "sde"
PREDICTORS = ("reverse_diffusion", "euler_maruyama", "none")


def draws(n_corrector: int = 1, **_) -> int:
    return n_corrector + 1


DRAWS = draws


def corrector_alpha(ctx: Context, t, t_next):
    sde = ctx.sde
    if isinstance(sde, VPSDE):
        return sde.corrector_alpha(t, t_next, score_sde_tables=ctx.score_sde_tables)
    if isinstance(sde, DiscreteVP):
        return sde.alpha_bar(t) / sde.alpha_bar(t_next)
    return torch.ones_like(t)


def run(
    ctx: Context,
    x,
    *,
    snr: float = 0.16,
    n_corrector: int = 1,
    predictor: str = "reverse_diffusion",
    norm: str = "sample",
    denoise: bool = True,
):
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor: expected one of {PREDICTORS}, got {predictor!r}")
    if n_corrector < 0:
        raise ValueError(f"n_corrector: must be >= 0, got {n_corrector}")
    N = len(ctx.times)
    for n in range(N):
        t = ctx.t_vec(ctx.times[n], x)
        t_next = reverse_diffusion.next_time(ctx, n, x)
        alpha = corrector_alpha(ctx, t, t_next).to(x.dtype)
        for j in range(n_corrector):
            s = ctx.score(x, t)
            x, _ = snr_langevin_step(
                x,
                s,
                snr,
                alpha=alpha,
                norm=norm,
                seed=ctx.seed,
                step=ctx.counter(n, j),
                stream=STREAM_SAMPLER,
                sample_ids=ctx.sample_ids,
                backend=ctx.backend,
            )
        last = denoise and n == N - 1
        if predictor != "none":
            s = ctx.score(x, t)
            step = reverse_diffusion if predictor == "reverse_diffusion" else euler_maruyama
            x = step.predictor_step(ctx, x, t, s, n, n_corrector, last)
        ctx.step_done(n, x, t)
    return x
