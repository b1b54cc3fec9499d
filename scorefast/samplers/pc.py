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
from .base import Context, Step

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
    if not (snr > 0 and norm in ("sample", "batch")):
        raise ValueError(f"snr, norm: need snr > 0 and norm in ('sample', 'batch'), got {snr!r}, {norm!r}")
    if n_corrector < 0:
        raise ValueError(f"n_corrector: must be >= 0, got {n_corrector}")
    times, next_times = ctx.schedule_times()
    alphas = ctx.table(corrector_alpha(ctx, times, next_times))
    stepper = reverse_diffusion if predictor == "reverse_diffusion" else euler_maruyama
    sched = stepper.schedule(ctx) if predictor != "none" else None
    N = len(alphas)

    def step(n: Step, x, last: bool = False):
        t = ctx.time(n)
        (alpha,) = alphas[n]
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
                backend=ctx.backend_name(x),
                _trusted=True,
            )
        if sched is not None:
            x = stepper.predictor_step(ctx, sched, x, ctx.score(x, t), n, n_corrector, last)
        return ctx.step_done(n, x, t)

    x = ctx.steps(step, x, 0, N - 1)
    return step(N - 1, x, last=denoise)
