"""Faithful eager copies of the peers' sampling loops (score_sde, k-diffusion, NCSN, diffusers), for racing."""

from __future__ import annotations

import torch


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ...] against x (score_sde's ``[:, None, None, None]``, k-diffusion's ``append_dims``)."""
    return v.reshape(-1, *([1] * (x.dim() - 1)))
