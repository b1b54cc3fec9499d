"""Langevin step: x + eps*score + sqrt(2*eps)*z (eps > 0, scalar or per sample)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from .fused_update import apply


def langevin_step(
    x: Tensor,
    score: Tensor,
    step_size: float | Tensor,
    *,
    seed: int | Tensor,
    step: int | Tensor,
    stream: int = 0,
    sample_ids: Tensor | None = None,
    out: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """One unadjusted Langevin step with the stream's noise z ~ N(0, I) shaped like x [B, ...].

    step_size (eps): a positive Python number, or a 0-d / [B] float tensor of positive values.
    """
    _checks.check_float_tensor("x", x)
    B = _checks.check_batched("x", x)
    _checks.check_like("score", score, x)
    eps = _checks.check_coef("step_size", step_size, B, x.device, positive=True)
    noise = (2.0 * eps) ** 0.5 if not isinstance(eps, Tensor) else torch.sqrt(2.0 * eps)
    return apply(
        x,
        [(eps, score)],
        noise=noise,
        seed=seed,
        step=step,
        stream=stream,
        sample_ids=sample_ids,
        x_coef=1.0,
        out=out,
        backend=backend,
        op="langevin_step",
    )
