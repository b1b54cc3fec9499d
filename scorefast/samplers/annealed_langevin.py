"""NCSN annealed Langevin dynamics (Song & Ermon 2019), as in its code.

steps = L noise levels sigma_1 > ... > sigma_L (the VE/EDM grid); at level i, n_steps_each steps
x + alpha_i s + sqrt(2 alpha_i) z with alpha_i = step_lr sigma_i^2 / sigma_L^2.  ``final_denoise``
adds NCSNv2's x + sigma_L^2 s (one more NFE).  Draws per level: n_steps_each.
"""

from __future__ import annotations

import torch

from .._checks import check_bool, check_finite_scalar, check_int
from ..sde import EDM, VESDE
from .base import Context, Step

NAME = "annealed_langevin"
DEFAULT_STEPS = 10
KIND = "langevin"


def draws(n_steps_each: int = 100, **_) -> int:
    return n_steps_each


DRAWS = draws


def validate(sde, *, step_lr, n_steps_each, final_denoise, denoise) -> dict:
    if not isinstance(sde, VESDE | EDM):
        raise ValueError(f"sampler: annealed_langevin needs a VE-type SDE (VESDE, EDM), not {type(sde).__name__}")
    return {
        "step_lr": check_finite_scalar("step_lr", step_lr, positive=True),
        "n_steps_each": check_int("n_steps_each", n_steps_each, minimum=1),
        "final_denoise": check_bool("final_denoise", final_denoise),
        "denoise": check_bool("denoise", denoise),
    }


def run(
    ctx: Context,
    x,
    *,
    step_lr: float = 2e-5,
    n_steps_each: int = 100,
    final_denoise: bool = False,
    denoise: bool = True,
):
    sde = ctx.sde
    sigmas = sde.std(ctx.times.to("cpu", torch.float64)).tolist()
    sigma_last = sigmas[-1]
    alphas = [step_lr * sigma**2 / sigma_last**2 for sigma in sigmas]
    sched = ctx.table([(alpha, (2 * alpha) ** 0.5) for alpha in alphas])

    def level(n: Step, x):
        t = ctx.time(n)
        for j in range(n_steps_each):  # sf.ops.langevin_step's update, one launch
            x = ctx.update_row(x, sched, n, [ctx.score(x, t)], cols=(1.0, 0, 1), j=j)
        return ctx.step_done(n, x, t)

    x = ctx.steps(level, x, 0, len(sigmas))
    if final_denoise:
        t = ctx.time(len(sigmas) - 1)
        x = ctx.update(x, [(sigma_last**2, ctx.score(x, t))], n=len(sigmas) - 1, j=0)
    return x
