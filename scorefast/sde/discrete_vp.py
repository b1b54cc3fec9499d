"""DiscreteVP: a VP SDE from a diffusers/DDPM ``alphas_cumprod`` table (index 0 = least noise).

T = 1, table position tau = t (N - 1); sigma_n = sqrt((1 - abar_n) / abar_n) with log sigma
interpolated linearly in tau (k-diffusion's rule); abar(t) = 1 / (1 + sigma(t)^2); beta(t) =
-d ln abar / dt of that interpolation.  The network sees tau.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import SDE


class DiscreteVP(SDE):
    eps = 0.0

    def __init__(self, alphas_cumprod: Tensor):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().cpu()
        if abar.numel() < 2 or not bool(((abar > 0) & (abar < 1)).all()):
            raise ValueError("alphas_cumprod: need at least 2 entries, each in (0, 1)")
        if not bool((abar[1:] <= abar[:-1]).all()):
            raise ValueError("alphas_cumprod: must be non-increasing (index 0 = least noise)")
        self.alphas_cumprod = abar
        self.N = abar.numel()
        self.log_sigmas = 0.5 * torch.log((1 - abar) / abar)

    @classmethod
    def linear(cls, N: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiscreteVP:
        """DDPM's linear beta table."""
        betas = torch.linspace(beta_start, beta_end, N, dtype=torch.float64)
        return cls(torch.cumprod(1 - betas, 0))

    @classmethod
    def cosine(cls, N: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> DiscreteVP:
        """Nichol & Dhariwal's cosine table (betas clipped at max_beta, as diffusers does)."""
        f = [math.cos((i / N + s) / (1 + s) * math.pi / 2) ** 2 for i in range(N + 1)]
        betas = torch.tensor([min(1 - f[i + 1] / f[i], max_beta) for i in range(N)], dtype=torch.float64)
        return cls(torch.cumprod(1 - betas, 0))

    def config(self):
        return {"alphas_cumprod": self.alphas_cumprod.tolist()}

    def _log_sigmas_on(self, device: torch.device) -> Tensor:
        """log sigma table on ``device``, copied once: a score call in a CUDA graph must not copy from the host."""
        cache = self.__dict__.setdefault("_log_sigmas_by_device", {})
        key = str(device)
        if key not in cache:
            cache[key] = self.log_sigmas.to(device)
        return cache[key]

    def _log_sigma_and_slope(self, t: Tensor) -> tuple[Tensor, Tensor]:
        tau = (t * (self.N - 1)).clamp(0, self.N - 1)
        lo = tau.floor().long().clamp(max=self.N - 2)
        w = tau - lo
        table = self._log_sigmas_on(t.device)
        a, b = table[lo], table[lo + 1]
        return a + w * (b - a), (b - a) * (self.N - 1)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.exp(self._log_sigma_and_slope(t)[0])

    def alpha_bar(self, t):
        return torch.sigmoid(-2 * self._log_sigma_and_slope(t)[0])

    def mean_coef(self, t):
        return self.alpha_bar(t).sqrt()

    def std(self, t):
        return (1 - self.alpha_bar(t)).sqrt()

    def beta(self, t):
        log_sigma, slope = self._log_sigma_and_slope(t)
        # ln abar = -ln(1 + sigma^2); d/dt = -2 sigma^2 / (1 + sigma^2) * d ln sigma / dt
        return 2 * torch.sigmoid(2 * log_sigma) * slope

    def drift_coef(self, t):
        return -0.5 * self.beta(t)

    def diffusion(self, t):
        return self.beta(t).clamp_min(0).sqrt()

    _SHORTCUT_USES = ("beta", "drift_coef", "diffusion")

    def _reverse_shortcut(self, t, probability_flow: bool):
        """a = -beta/2, g^2 = max(beta, 0): the table interpolation once."""
        beta = self.beta(t)
        neg_g2 = -beta.clamp_min(0)
        return -0.5 * beta, 0.5 * neg_g2 if probability_flow else neg_g2

    def prior_std(self):
        return 1.0

    def time_map(self, t):
        return t * (self.N - 1)
