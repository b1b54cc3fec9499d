"""Euler–Maruyama step: x + drift*dt + diffusion*sqrt(|dt|)*z (dt finite, nonzero; < 0 in reverse time)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from .fused_update import apply


def euler_maruyama_step(
    x: Tensor,
    drift: Tensor,
    diffusion: float | Tensor,
    dt: float | Tensor,
    *,
    seed: int | Tensor,
    step: int | Tensor,
    stream: int = 0,
    sample_ids: Tensor | None = None,
    out: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """One EM step of dx = f dt + g dW for x, drift f [B, ...].

    diffusion g and dt: Python numbers, 0-d or [B] tensors (per sample, e.g. g(t_i)).
    """
    _checks.check_float_tensor("x", x)
    B = _checks.check_batched("x", x)
    _checks.check_like("drift", drift, x)
    dt = _checks.check_coef("dt", dt, B, x.device, nonzero=True)
    g = _checks.check_coef("diffusion", diffusion, B, x.device)
    root = abs(dt) ** 0.5 if not isinstance(dt, Tensor) else torch.sqrt(dt.abs())
    noise = g * root
    return apply(
        x,
        [(dt, drift)],
        noise=noise,
        seed=seed,
        step=step,
        stream=stream,
        sample_ids=sample_ids,
        x_coef=1.0,
        out=out,
        backend=backend,
        op="euler_maruyama_step",
    )
