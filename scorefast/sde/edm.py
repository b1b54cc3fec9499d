"""EDM (Karras et al. 2022): time is sigma; x_sigma = x_0 + sigma n, dx = sqrt(2 sigma) dW."""

from __future__ import annotations

import torch

from .base import SDE


class EDM(SDE):
    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, sigma_data: float = 0.5):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"sigma_min, sigma_max: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if rho <= 0:
            raise ValueError(f"rho: must be > 0, got {rho}")
        self.sigma_min, self.sigma_max, self.rho, self.sigma_data = map(float, (sigma_min, sigma_max, rho, sigma_data))
        self.T, self.eps, self.N = self.sigma_max, self.sigma_min, 18

    def config(self):
        return {
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "rho": self.rho,
            "sigma_data": self.sigma_data,
        }

    def mean_coef(self, t):
        return torch.ones_like(t)

    def std(self, t):
        return t

    def alpha_bar(self, t):
        return torch.ones_like(t)

    def drift_coef(self, t):
        return torch.zeros_like(t)

    def diffusion(self, t):
        return torch.sqrt(2 * t)

    _SHORTCUT_USES = ("drift_coef", "diffusion")

    def _reverse_shortcut(self, t, probability_flow: bool):
        """a = 0, g^2 = 2 sigma: b = -sigma (ODE) or -2 sigma (SDE)."""
        return torch.zeros_like(t), -t if probability_flow else -2.0 * t

    def prior_std(self):
        return self.sigma_max

    def sigma(self, t):
        return t

    def discretize_coefs(self, t, t_next, *, score_sde_tables: bool = False):
        return torch.zeros_like(t), (t**2 - t_next**2).clamp_min(0).sqrt()

    def grid(self, steps, device=None):
        """Karras et al. rho-schedule from sigma_max to sigma_min (float64)."""
        return karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho, device)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device=None) -> torch.Tensor:
    """n sigmas decreasing from sigma_max to sigma_min, uniform in sigma^(1/rho) (float64)."""
    if n == 1:
        return torch.tensor([sigma_max], dtype=torch.float64, device=device)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho
