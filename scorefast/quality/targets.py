"""Targets with exact scores for the quality suite: the 2-D ring and random anisotropic mixtures.

``RotatedMixture`` is a ``GaussianMixture`` whose components share one eigenbasis R (a random
rotation) and differ in means, weights and spectra: Sigma_k = R diag(lam_k) R^T.  Its score and
log-density are the parent's, computed in the eigenbasis: one rotation of x per call (B d^2) instead
of one per component (B K d^2), which is what lets a 64-D target run hundreds of samplers in minutes.
Samples, perturbed densities under any SDE and everything else come from ``GaussianMixture``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..rng import FIRST_USER_STREAM, randn
from ..testing import GaussianMixture, _marginal_coefs


class RotatedMixture(GaussianMixture):
    """sum_k w_k N(mu_k, R diag(lam_k) R^T) in R^d.

    Args:
        weights: [K] positive.  means: [K, d].  variances: [K, d] positive spectra lam_k.
        rotation: [d, d] orthogonal R (its columns are the shared eigenvectors).
    """

    def __init__(self, weights, means, variances, rotation):
        lam = torch.as_tensor(variances, dtype=torch.float64)
        R = torch.as_tensor(rotation, dtype=torch.float64)
        if R.dim() != 2 or R.shape[0] != R.shape[1] or lam.dim() != 2 or lam.shape[1] != R.shape[0]:
            raise ValueError(
                f"variances, rotation: expected [K, d] and [d, d], got {tuple(lam.shape)}, {tuple(R.shape)}"
            )
        if not torch.allclose(R.T @ R, torch.eye(R.shape[0], dtype=torch.float64), atol=1e-10):
            raise ValueError("rotation: must be orthogonal")
        if not bool((lam > 0).all()):
            raise ValueError("variances: must be positive")
        super().__init__(weights, means, (R * lam[:, None, :]) @ R.T)
        self.rotation, self.spectra = R, lam
        self._rotated_means = torch.as_tensor(means, dtype=torch.float64) @ R
        self._fast: dict[str, tuple[Tensor, ...]] = {}

    def _fast_on(self, device: torch.device) -> tuple[Tensor, ...]:
        key = str(device)
        if key not in self._fast:
            self._fast[key] = tuple(
                v.to(device) for v in (self.weights.log(), self._rotated_means, self.spectra, self.rotation)
            )
        return self._fast[key]

    def _terms(self, x: Tensor, t, sde) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(log w_k N_k(x) [B, K], x in the eigenbasis y [B, d], 1 / var [B|1, K, d], mean / var [B|1, K, d]).

        p_t's component k is N(a mu_k, R diag(a^2 lam_k + s^2) R^T).  With one time for the whole
        batch (a CPU tensor of equal entries: what a sampler passes) the Mahalanobis terms are three
        [B, d] x [d, K] products; per-sample times take the [B, K, d] route."""
        x64 = x.reshape(x.shape[0], -1).to(torch.float64)
        B = x64.shape[0]
        if x64.shape[1] != self.dim:
            raise ValueError(f"x: expected {self.dim} features per sample, got {x64.shape[1]}")
        log_w, m, lam, R = self._fast_on(x64.device)
        y = x64 @ R
        if sde is None:
            a = s = None
        else:
            if t is None:
                raise ValueError("t: needed with sde")
            t = torch.as_tensor(t, dtype=torch.float64, device=x64.device).reshape(-1).expand(B)
            if x64.device.type == "cpu" and B > 0 and bool((t == t[0]).all()):
                t = t[:1]
            a, s = _marginal_coefs(sde, t, self.dim)
        if a is None or a.numel() == 1:
            var = lam if a is None else a**2 * lam + s**2  # [K, d]
            inv = 1 / var
            am = m if a is None else a * m
            ami = am * inv
            maha = (y * y) @ inv.T - 2 * (y @ ami.T) + (am * ami).sum(-1)
            inv, ami = inv[None], ami[None]
        else:
            var = a[:, None, None] ** 2 * lam + (s**2)[:, None, None]  # [B, K, d]
            inv = 1 / var
            am = a[:, None, None] * m
            ami = am * inv
            diff = y[:, None, :] - am
            maha = (diff * diff * inv).sum(-1)
        logp_k = log_w - 0.5 * (maha + var.log().sum(-1) + self.dim * math.log(2 * math.pi))
        return logp_k, y, inv, ami

    def log_prob(self, x: Tensor, t=None, sde=None) -> Tensor:
        return torch.logsumexp(self._terms(x, t, sde)[0], dim=1)

    def score(self, x: Tensor, t=None, sde=None) -> Tensor:
        logp_k, y, inv, ami = self._terms(x, t, sde)
        resp = torch.softmax(logp_k, dim=1)[:, :, None]  # -sum_k resp_k (y - a m_k) / var_k, rotated back
        s = (
            ((resp * ami).sum(1) - y * (resp * inv).sum(1))
            if inv.shape[0] > 1
            else (resp[:, :, 0] @ ami[0] - y * (resp[:, :, 0] @ inv[0]))
        )
        return (s @ self.rotation.to(s.device).T).reshape(x.shape).to(x.dtype)

    def sample(self, n: int, *, seed: int = 0, stream: int = FIRST_USER_STREAM, t=None, sde=None, **kw) -> Tensor:
        """Exact samples as ``GaussianMixture.sample`` (the same normals and component choice), with
        Sigma_k^1/2 = R diag(lam_k)^1/2 for the data (no Cholesky per sample); p_t via the parent."""
        if sde is not None or t is not None:
            return super().sample(n, seed=seed, stream=stream, t=t, sde=sde, **kw)
        dtype, device = kw.get("dtype", torch.float64), torch.device(kw.get("device") or "cpu")
        u = randn(
            (n, self.dim + 2),
            seed=seed,
            stream=stream,
            sample_ids=torch.arange(n, device=device),
            dtype=torch.float64,
            backend="torch",
            device=device,
        )
        uniform = 0.5 * (1 + torch.erf(u[:, -1] / math.sqrt(2)))
        k = torch.searchsorted(torch.cumsum(self.weights.to(device), 0), uniform.clamp(max=1 - 1e-12))
        R, lam, mu = self.rotation.to(device), self.spectra.to(device), self.means.to(device)
        return (mu[k] + (lam[k].sqrt() * u[:, : self.dim]) @ R.T).to(dtype)


def ring(n_modes: int = 8, radius: float = 4.0, std: float = 0.35) -> RotatedMixture:
    """``GaussianMixture.ring`` (default: ``GaussianMixture.builtin()``) as a ``RotatedMixture`` (R = I)."""
    gm = GaussianMixture.ring(n_modes, radius, std)
    return RotatedMixture(
        gm.weights, gm.means, torch.diagonal(gm.covs, dim1=1, dim2=2), torch.eye(2, dtype=torch.float64)
    )


def random_mixture(dim: int, n_components: int, *, seed: int, separation: float = 7.0) -> RotatedMixture:
    """A random anisotropic mixture in R^dim, fixed by ``seed`` (float64, CPU generator).

    A Haar-random shared eigenbasis; each component's spectrum log-uniform in [0.01, 1] (standard
    deviations 0.1 to 1 along the axes); means N(0, s^2 I) with s = separation / sqrt(2 dim), so two
    means lie about ``separation`` apart whatever the dimension; weights uniform in [0.5, 1.5],
    normalised.
    """
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    rotation = q * torch.sign(torch.diagonal(r))  # Haar: fix the signs of QR
    spectra = torch.exp(torch.empty(n_components, dim, dtype=torch.float64).uniform_(math.log(0.01), 0.0, generator=g))
    means = torch.randn(n_components, dim, generator=g, dtype=torch.float64) * (separation / math.sqrt(2 * dim))
    weights = torch.empty(n_components, dtype=torch.float64).uniform_(0.5, 1.5, generator=g)
    return RotatedMixture(weights, means, spectra, rotation)


@dataclass(frozen=True)
class Target:
    """A target of the quality suite: ``make()`` builds the mixture; ``n`` samples are compared."""

    name: str
    description: str
    n: int
    quick_n: int
    make: object

    def build(self) -> GaussianMixture:
        return self.make()


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("ring2d", "2-D ring: 8 modes on radius 4, std 0.35 (GaussianMixture.builtin)", 2048, 256, ring),
        Target(
            "gmm16",
            "16-D random anisotropic mixture, 8 components (seed 16)",
            1024,
            512,
            lambda: random_mixture(16, 8, seed=16),
        ),
        Target(
            "gmm64",
            "64-D random anisotropic mixture, 8 components (seed 64)",
            1024,
            512,
            lambda: random_mixture(64, 8, seed=64),
        ),
    )
}
