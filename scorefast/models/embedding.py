"""Noise-level embeddings of the time input a network sees (``time_map`` of the SDE's time).

``sinusoidal`` is DDPM's positional embedding of a value in [0, 1000) (VP: t * 999);
``fourier`` is NCSN++'s Gaussian Fourier projection of log(value) (VE / EDM: sigma).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

EMBEDDINGS = ("sinusoidal", "fourier")


class SinusoidalEmbedding(nn.Module):
    """[B] -> [B, dim]: sin/cos of value * 10000**(-k / (dim/2 - 1)) (DDPM)."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        arg = t.float()[:, None] * self.freqs[None, :]
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class FourierEmbedding(nn.Module):
    """[B] -> [B, dim]: sin/cos(2 pi W log(value)), W ~ N(0, scale^2) fixed (NCSN++)."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("W", torch.randn(dim // 2, generator=torch.Generator().manual_seed(0)) * scale)

    def forward(self, t: Tensor) -> Tensor:
        arg = 2 * math.pi * torch.log(t.float().clamp_min(1e-20))[:, None] * self.W[None, :]
        return torch.cat([arg.sin(), arg.cos()], dim=1)


def make_embedding(kind: str, dim: int) -> nn.Module:
    if kind == "sinusoidal":
        return SinusoidalEmbedding(dim)
    if kind == "fourier":
        return FourierEmbedding(dim)
    raise ValueError(f"time_embedding: expected one of {', '.join(EMBEDDINGS)}, got {kind!r}")
