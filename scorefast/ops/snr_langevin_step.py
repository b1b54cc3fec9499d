"""Langevin corrector with a signal-to-noise step size (score_sde's ``LangevinCorrector``).

Pass 1 takes ||score||^2 and ||z||^2 per sample (z made in-kernel, never stored, fixed-order sums);
eps = 2*alpha*snr**2 * ||z||^2/||score||^2; pass 2 regenerates z: x + eps*score + sqrt(2*eps)*z.
``norm="batch"`` averages the norms over the batch first, as score_sde and diffusers do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from .fused_update import apply
from .sample_norm import noise_and_term_sumsq

NORMS = ("sample", "batch")


def snr_langevin_step(
    x: Tensor,
    score: Tensor,
    snr: float,
    *,
    alpha: float | Tensor = 1.0,
    norm: str = "sample",
    seed: int | Tensor,
    step: int | Tensor,
    stream: int = 0,
    sample_ids: Tensor | None = None,
    out: Tensor | None = None,
    backend: str | None = None,
    _trusted: bool = False,
) -> tuple[Tensor, Tensor]:
    """Returns (x_new [B, ...], eps [B]).  A zero score gives eps = 0 (x unchanged), not NaN."""
    B = x.shape[0]
    if not _trusted:
        _validate(x, score, snr, alpha, norm)
    elif type(score) is not Tensor or score.shape != x.shape or score.device != x.device:
        _checks.check_like("score", score, x)  # the trusted (sampler) path's one cheap check
    sums = noise_and_term_sumsq(
        score, x, seed=seed, step=step, stream=stream, sample_ids=sample_ids, backend=backend, trusted=_trusted
    )
    if norm == "batch":  # the batch means of the norms (not of their squares), as score_sde
        sums = sums.sqrt().mean(1, keepdim=True).square().expand(2, B)
    g2, z2 = sums[0], sums[1]
    # eps = 2 alpha snr^2 ||z||^2 / ||score||^2, from the squared norms (no square roots); the inner
    # where keeps the gradient finite where the score is zero (eps = 0 there)
    scored = g2 > 0
    eps = torch.where(scored, (2.0 * snr * snr) * alpha * (z2 / torch.where(scored, g2, 1.0)), 0.0)
    x_new = apply(
        x,
        [(eps, score)],
        noise=torch.sqrt(2.0 * eps),
        seed=seed,
        step=step,
        stream=stream,
        sample_ids=sample_ids,
        x_coef=1.0,
        out=out,
        backend=backend,
        op="snr_langevin_step",
        trusted=_trusted,
    )
    return x_new, eps


def _validate(x, score, snr, alpha, norm) -> None:
    _checks.check_float_tensor("x", x)
    B = _checks.check_batched("x", x)
    snr = _checks.check_finite_scalar("snr", snr, positive=True)
    alpha = _checks.check_coef("alpha", alpha, B, x.device, positive=True)
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
    _checks.check_like("score", score, x)
