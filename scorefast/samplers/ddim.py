"""DDIM (Song et al. 2021) for any SDE with x_t = a(t) x_0 + s(t) n, eta in [0, 1].

x0 = (x + s_t^2 score) / a_t, eps = -s_t score; x_next = a_n x0 + sqrt(s_n^2 - sig^2) eps + sig z with
sig = eta * (s_n / s_t) * sqrt(s_t^2 - a_t^2 s_n^2 / a_n^2).  The step from eps to the data end
(a = 1, s = 0) returns x0.
"""

from __future__ import annotations

import torch

from .._checks import check_bool, check_real
from .base import Context, Step, StepTable
from .euler_maruyama import predictor_step, run_predictor

NAME = "ddim"
DRAWS = 1
DEFAULT_STEPS = 50
KIND = "sde"


def schedule(ctx: Context, eta: float) -> StepTable:
    """Per step (x coefficient a_n / a_t, score coefficient, sig), once per run."""
    sde = ctx.sde
    times, _ = ctx.schedule_times()
    a_t, s_t = sde.mean_coef(times), sde.std(times)
    a_n, s_n = ctx.next_coefs()
    sig = eta * (s_n / s_t) * torch.sqrt((s_t**2 - a_t**2 * s_n**2 / a_n**2).clamp_min(0))
    direction = torch.sqrt((s_n**2 - sig**2).clamp_min(0))
    # x_next = (a_n / a_t) x + (a_n s_t^2 / a_t - direction * s_t) score + sig z
    return ctx.table(torch.stack([a_n / a_t, a_n * s_t**2 / a_t - direction * s_t, sig], 1))


def validate(sde, *, eta, denoise) -> dict:
    return {"eta": check_real("eta", eta, lo=0.0, hi=1.0), "denoise": check_bool("denoise", denoise)}


def run(ctx: Context, x, *, eta: float = 0.0, denoise: bool = True):
    # eta = 0: a deterministic step (no noise term at all, also under graphs)
    return run_predictor(ctx, x, schedule(ctx, eta), predictor_step if eta > 0 else _deterministic_step, denoise)


def _deterministic_step(ctx: Context, sched: StepTable, x, s, n: Step, j: int, last: bool):
    return predictor_step(ctx, sched, x, s, n, j, last=True)
