"""Sample-quality metrics of the quality suite: sliced W1 with its Monte-Carlo floor, Fréchet distance.

All arithmetic is float64 on the CPU; inputs are sample sets [n, d] (any float dtype, any device).
"""

from __future__ import annotations

import torch
from torch import Tensor

N_PROJECTIONS = 256


def _directions(d: int, n_proj: int, seed: int) -> Tensor:
    """n_proj unit directions [d, n_proj] (float64) from a seeded CPU generator."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(d, n_proj, generator=g, dtype=torch.float64)
    return dirs / dirs.norm(dim=0)


def sliced_w1(a: Tensor, b: Tensor, *, n_proj: int = N_PROJECTIONS, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between sample sets a [n, d] and b [m, d], m a multiple of n.

    The mean over ``n_proj`` random unit directions (fixed by ``seed``, so every sampler is scored on
    the same directions) of the 1-D W1 between the projections: the integral of |Q_a(u) - Q_b(u)|
    over the quantile level u, which for sorted projections is the mean absolute difference of a's
    sorted values, each repeated m / n times, and b's.  A reference b much larger than a removes
    most of the reference's own Monte-Carlo noise.  Compare with ``mc_floor``.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a, b: expected sample sets [n, d] and [m, d], got {tuple(a.shape)}, {tuple(b.shape)}")
    n, m = a.shape[0], b.shape[0]
    if n < 1 or m % n:
        raise ValueError(f"b: its size {m} must be a positive multiple of a's size {n}")
    if n_proj < 1:
        raise ValueError(f"n_proj: must be >= 1, got {n_proj}")
    dirs = _directions(a.shape[1], n_proj, seed)
    pa, _ = (a.detach().to("cpu", torch.float64) @ dirs).sort(0)
    pb, _ = (b.detach().to("cpu", torch.float64) @ dirs).sort(0)
    w1 = (pa.repeat_interleave(m // n, dim=0) - pb).abs().mean(0)
    if not bool(torch.isfinite(w1).all()):
        return float("inf")  # a diverged sampler: infinitely far, not NaN
    return w1.mean().item()


def mc_floor(sample_fn, reference: Tensor, seeds, **kw) -> tuple[float, float]:
    """(mean, standard deviation) of ``sliced_w1(sample_fn(seed), reference)`` over seeds: what an exact
    sampler scores with this many samples (the Monte-Carlo floor) and how much it moves."""
    values = torch.tensor([sliced_w1(sample_fn(seed), reference, **kw) for seed in seeds], dtype=torch.float64)
    return values.mean().item(), (values.std().item() if len(values) > 1 else 0.0)


def _sqrtm_psd(m: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigh; negatives clipped)."""
    lam, U = torch.linalg.eigh((m + m.T) / 2)
    return (U * lam.clamp_min(0).sqrt()) @ U.T


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [n_a, k] and [n_b, k]:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) (float64; FID's formula)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(
            f"a, b: expected feature sets [n >= 2, k] of one width, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return float("inf")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root_a @ s_b @ root_a)
    fd = (mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * torch.trace(cross)
    return max(fd.item(), 0.0)
