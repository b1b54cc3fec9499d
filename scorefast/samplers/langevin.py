"""Unadjusted Langevin dynamics with a fixed score: x + eps s + sqrt(2 eps) z at t = sde.eps.

``steps`` iterations of ``sf.ops.langevin_step`` with ``step_size`` (default 1e-3) on score(x, eps).
"""

from __future__ import annotations

import torch

from .._checks import check_bool, check_finite_scalar
from .base import Context, Step

NAME = "langevin"
DRAWS = 1
DEFAULT_STEPS = 1000
KIND = "langevin"


def validate(sde, *, step_size, denoise) -> dict:
    return {
        "step_size": check_finite_scalar("step_size", step_size, positive=True),
        "denoise": check_bool("denoise", denoise),
    }


def run(ctx: Context, x, *, step_size: float = 1e-3, denoise: bool = True):
    N = len(ctx.times)
    times = ctx.time_table(torch.full((N,), float(ctx.sde.eps), dtype=torch.float64))
    sched = ctx.table(torch.tensor([[step_size, (2 * step_size) ** 0.5]], dtype=torch.float64).expand(N, 2))

    def step(n: Step, x):  # sf.ops.langevin_step's update x + eps s + sqrt(2 eps) z, one launch
        t = times.at(n)
        x = ctx.update_row(x, sched, n, [ctx.score(x, t)], cols=(1.0, 0, 1))
        return ctx.step_done(n, x, t)

    return ctx.steps(step, x, 0, len(ctx.times))
