"""Closed-form targets for validating samplers, likelihoods and losses.

``GaussianMixture`` gives exact samples, log-densities, scores and probability-flow velocities of a
mixture of Gaussians and of its perturbation by any SDE whose marginal is affine: x_t = a(t) x_0 +
s(t) n, read off the SDE's ``marginal_prob(x0, t) -> (mean, std)`` (VE, VP, sub-VP, EDM, DiscreteVP,
RectifiedFlow: a = 1 - t, s = t).  Then p_t = sum_k w_k N(a mu_k, a^2 Sigma_k + s^2 I) exactly.
Arithmetic is float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .rng import FIRST_USER_STREAM, randn


def _marginal_coefs(sde, t: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """(a(t) [B], s(t) [B]) of x_t = a x_0 + s n, from sde.marginal_prob."""
    t = torch.as_tensor(t, dtype=torch.float64)
    ones = torch.ones(t.shape[0], dim, dtype=torch.float64, device=t.device)
    mean, std = sde.marginal_prob(ones, t)
    a = mean.reshape(t.shape[0], -1)[:, 0].to(torch.float64)
    s = torch.as_tensor(std, dtype=torch.float64, device=t.device).reshape(-1).expand(t.shape[0])
    return a, s


class GaussianMixture:
    """sum_k weights[k] N(means[k], covs[k]) in R^d.

    Args:
        weights: [K] positive (normalised here).
        means: [K, d].
        covs: [K, d, d] SPD, [K, d] diagonals, [K] or a float isotropic variances (default 1).
    """

    def __init__(
        self,
        weights: Sequence[float] | Tensor,
        means: Sequence[Sequence[float]] | Tensor,
        covs: Tensor | Sequence | float | None = None,
    ):
        w = torch.as_tensor(weights, dtype=torch.float64)
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.dim() != 2 or w.dim() != 1 or w.shape[0] != mu.shape[0]:
            raise ValueError(
                f"means: expected [K, d] with K = len(weights), got {tuple(mu.shape)} and {tuple(w.shape)}"
            )
        if not bool((w > 0).all()):
            raise ValueError("weights: must be positive")
        K, d = mu.shape
        if covs is None:
            covs = 1.0
        c = torch.as_tensor(covs, dtype=torch.float64)
        if c.dim() == 0:
            c = c * torch.eye(d, dtype=torch.float64).expand(K, d, d)
        elif c.dim() == 1:
            c = c[:, None, None] * torch.eye(d, dtype=torch.float64)
        elif c.dim() == 2:
            c = torch.diag_embed(c)
        if c.shape != (K, d, d):
            raise ValueError(f"covs: expected [K, d, d] = {(K, d, d)}, got {tuple(c.shape)}")
        if not bool((torch.linalg.eigvalsh(c) > 0).all()):
            raise ValueError("covs: must be symmetric positive definite")
        self.weights = w / w.sum()
        self.means = mu
        self.covs = c.contiguous()
        self.dim = d
        self._device_params: dict[str, tuple[Tensor, ...]] = {}

    @classmethod
    def builtin(cls) -> GaussianMixture:
        """The package's built-in 2-D mixture (``gmm2d`` / ``toy2d``): 8 modes on a radius-4 ring, std 0.35."""
        return cls.ring(8, 4.0, 0.35)

    @classmethod
    def ring(cls, n_modes: int = 8, radius: float = 4.0, std: float = 0.3, dim: int = 2) -> GaussianMixture:
        """n_modes equal-weight isotropic modes on a circle (first two coordinates)."""
        angle = torch.arange(n_modes, dtype=torch.float64) * 2 * math.pi / n_modes
        means = torch.zeros(n_modes, dim, dtype=torch.float64)
        means[:, 0], means[:, 1] = radius * torch.cos(angle), radius * torch.sin(angle)
        return cls(torch.ones(n_modes), means, std**2)

    # -- the (perturbed) parameters -------------------------------------------------------
    def _on(self, device: torch.device) -> tuple[Tensor, ...]:
        """(weights, means, eigenvalues [K, d], eigenvectors [K, d, d]) of the covariances on ``device``,
        copied once per device: a captured step must not copy host tensors."""
        key = str(device)
        if key not in self._device_params:
            lam, U = torch.linalg.eigh(self.covs)
            self._device_params[key] = tuple(v.to(device) for v in (self.weights, self.means, lam, U))
        return self._device_params[key]

    def _params(self, B: int, t: Tensor | None, sde, device) -> tuple[Tensor, Tensor]:
        """Per-sample means [B, K, d] and covariances [B, K, d, d] of p_t (for exact sampling)."""
        mu, cov = self.means.to(device), self.covs.to(device)
        if sde is None:
            return mu.expand(B, *mu.shape), cov.expand(B, *cov.shape)
        if t is None:
            raise ValueError("t: needed with sde")
        t = torch.as_tensor(t, dtype=torch.float64, device=device).reshape(-1).expand(B)
        a, s = _marginal_coefs(sde, t, self.dim)
        eye = torch.eye(self.dim, dtype=torch.float64, device=device)
        means = a[:, None, None] * mu
        covs = a[:, None, None, None] ** 2 * cov + s[:, None, None, None] ** 2 * eye
        return means, covs

    def _component_terms(self, x: Tensor, t, sde):
        """(x [B, d] float64, log w_k N_k(x) [B, K], Sigma_k(t)^-1 (x - mu_k(t)) [B, K, d]).

        p_t's component k is N(a mu_k, a^2 Sigma_k + s^2 I), which shares Sigma_k's eigenvectors U_k:
        its eigenvalues are a^2 lambda_k + s^2, so no factorisation per time (and nothing that syncs
        or has a data-dependent shape: a CUDA graph can capture it).
        """
        x64 = x.reshape(x.shape[0], -1).to(torch.float64)
        B = x64.shape[0]
        if x64.shape[1] != self.dim:
            raise ValueError(f"x: expected {self.dim} features per sample, got {x64.shape[1]}")
        weights, mu, lam, U = self._on(x64.device)
        if sde is not None:
            if t is None:
                raise ValueError("t: needed with sde")
            t = torch.as_tensor(t, dtype=torch.float64, device=x64.device).reshape(-1).expand(B)
            a, s = _marginal_coefs(sde, t, self.dim)
            means = a[:, None, None] * mu  # [B, K, d]
            var = a[:, None, None] ** 2 * lam + (s**2)[:, None, None]  # [B, K, d]
        else:
            means, var = mu.expand(B, *mu.shape), lam.expand(B, *lam.shape)
        diff = x64[:, None, :] - means  # [B, K, d]
        proj = torch.einsum("kji,bkj->bki", U, diff) / var  # U^T (x - mu) / eigenvalues
        sol = torch.einsum("kij,bkj->bki", U, proj)  # Sigma^-1 (x - mu)
        maha = (diff * sol).sum(-1)
        log_norm = torch.log(var).sum(-1) + self.dim * math.log(2 * math.pi)
        logp_k = torch.log(weights) - 0.5 * (maha + log_norm)
        return x64, logp_k, sol

    def log_prob(self, x: Tensor, t: Tensor | float | None = None, sde=None) -> Tensor:
        """log p(x) [B] (float64) of the mixture, or of p_t under ``sde`` at time(s) t."""
        _, logp_k, _ = self._component_terms(x, t, sde)
        return torch.logsumexp(logp_k, dim=1)

    def score(self, x: Tensor, t: Tensor | float | None = None, sde=None) -> Tensor:
        """grad_x log p(x) (or of p_t), shaped and typed like x."""
        _, logp_k, sol = self._component_terms(x, t, sde)
        resp = torch.softmax(logp_k, dim=1)  # [B, K]
        s = -(resp[:, :, None] * sol).sum(1)
        return s.reshape(x.shape).to(x.dtype)

    def score_fn(self, sde):
        """score_fn(x, t) -> exact score of p_t, in x's dtype: a drop-in network for samplers."""
        return lambda x, t, **_: self.score(x, t, sde)

    def velocity(self, x: Tensor, t: Tensor | float, sde) -> Tensor:
        """The probability-flow velocity dx/dt of p_t, shaped and typed like x (float64 inside).

        With x_t = a x_0 + s n it is a' E[x_0 | x_t] + s' E[n | x_t] (rates from ``sde.marginal_rates``);
        per component k, r = x - a mu_k and C_k = a^2 Sigma_k + s^2 I give E[x_0 | x, k] = mu_k +
        a Sigma_k C_k^-1 r and E[n | x, k] = s C_k^-1 r, weighted by the responsibilities.  On
        ``RectifiedFlow`` (a' = -1, s' = 1) this is E[n - x_0 | x_t], the flow-matching target, with
        no division by t or 1 - t (finite at both ends)."""
        x64, logp_k, sol = self._component_terms(x, t, sde)
        B = x64.shape[0]
        _, mu, lam, U = self._on(x64.device)
        t = torch.as_tensor(t, dtype=torch.float64, device=x64.device).reshape(-1).expand(B)
        a, s = _marginal_coefs(sde, t, self.dim)
        da, ds = (torch.as_tensor(r, dtype=torch.float64, device=x64.device).expand(B) for r in sde.marginal_rates(t))
        cov_sol = torch.einsum("kij,bkj->bki", U, lam * torch.einsum("kji,bkj->bki", U, sol))  # Sigma_k C_k^-1 r
        x0 = mu + a[:, None, None] * cov_sol  # [B, K, d]
        noise = s[:, None, None] * sol
        v_k = da[:, None, None] * x0 + ds[:, None, None] * noise
        resp = torch.softmax(logp_k, dim=1)
        return (resp[:, :, None] * v_k).sum(1).reshape(x.shape).to(x.dtype)

    def velocity_fn(self, sde):
        """velocity_fn(x, t) -> exact velocity of p_t (``velocity``): a drop-in flow-matching network."""
        return lambda x, t, **_: self.velocity(x, t, sde)

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        """Mean [d] and covariance [d, d] of the mixture."""
        w = self.weights
        m = (w[:, None] * self.means).sum(0)
        dev = self.means - m
        cov = (w[:, None, None] * (self.covs + dev[:, :, None] * dev[:, None, :])).sum(0)
        return m, cov

    def sample(
        self,
        n: int,
        *,
        seed: int = 0,
        stream: int = FIRST_USER_STREAM,
        t=None,
        sde=None,
        dtype: torch.dtype = torch.float64,
        device=None,
    ) -> Tensor:
        """n exact samples [n, d] of the mixture (or of p_t), from the Philox stream ``stream``."""
        device = torch.device(device or "cpu")
        ids = torch.arange(n, device=device)
        u = randn(
            (n, self.dim + 2),
            seed=seed,
            stream=stream,
            sample_ids=ids,
            dtype=torch.float64,
            backend="torch",
            device=device,
        )
        # component choice from the normal CDF of the last coordinate: a uniform in (0, 1)
        uniform = 0.5 * (1 + torch.erf(u[:, -1] / math.sqrt(2)))
        k = torch.searchsorted(torch.cumsum(self.weights.to(device), 0), uniform.clamp(max=1 - 1e-12))
        means, covs = self._params(n, t, sde, device)
        chol = torch.linalg.cholesky(covs[torch.arange(n), k])
        return (means[torch.arange(n), k] + (chol @ u[:, : self.dim, None]).squeeze(-1)).to(dtype)


def sliced_wasserstein(a: Tensor, b: Tensor, n_proj: int = 128, seed: int = 0, p: int = 2) -> float:
    """Sliced p-Wasserstein distance (p = 1 or 2) between two equal-size sample sets [n, d] (float64).

    The p-mean over n_proj random unit directions of the sorted-projection distance (p = 2: RMS;
    p = 1, less moved by a few tail points: mean absolute); compare against the same distance
    between two exact sample sets (the Monte-Carlo floor).
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a, b: expected two [n, d] sample sets of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    if p not in (1, 2):
        raise ValueError(f"p: expected 1 or 2, got {p!r}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0)
    pa, _ = (a.double().cpu() @ dirs).sort(0)
    pb, _ = (b.double().cpu() @ dirs).sort(0)
    if p == 1:
        return (pa - pb).abs().mean().item()
    return ((pa - pb) ** 2).mean().sqrt().item()
