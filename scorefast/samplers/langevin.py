"""Unadjusted Langevin dynamics with a fixed score: x + eps s + sqrt(2 eps) z at t = sde.eps.

``steps`` iterations of ``sf.ops.langevin_step`` with ``step_size`` (default 1e-3) on score(x, eps).
"""

from __future__ import annotations

from ..ops import langevin_step
from ..rng import STREAM_SAMPLER
from .base import Context

NAME = "langevin"
DRAWS = 1
DEFAULT_STEPS = 1000
KIND = "langevin"


def run(ctx: Context, x, *, step_size: float = 1e-3, denoise: bool = True):
    t = ctx.t_vec(ctx.sde.eps, x)
    for n in range(len(ctx.times)):
        x = langevin_step(
            x,
            ctx.score(x, t),
            step_size,
            seed=ctx.seed,
            step=ctx.counter(n),
            stream=STREAM_SAMPLER,
            sample_ids=ctx.sample_ids,
            backend=ctx.backend,
        )
        ctx.step_done(n, x, t)
    return x
