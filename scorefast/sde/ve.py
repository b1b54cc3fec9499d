"""Variance-exploding SDE (SMLD / NCSN): sigma(t) = sigma_min (sigma_max / sigma_min)^t."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import SDE, as_time, bcast


class VESDE(SDE):
    eps = 1e-5

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"sigma_min, sigma_max: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max, self.N = float(sigma_min), float(sigma_max), int(N)
        self.discrete_sigmas = torch.exp(
            torch.linspace(math.log(sigma_min), math.log(sigma_max), N, dtype=torch.float64)
        )

    def config(self):
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "N": self.N}

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def mean_coef(self, t):
        return torch.ones_like(t)

    def std(self, t):
        return self.sigma(t)

    def alpha_bar(self, t):
        return torch.ones_like(t)

    def drift_coef(self, t):
        return torch.zeros_like(t)

    def diffusion(self, t):
        return self.sigma(t) * math.sqrt(2 * (math.log(self.sigma_max) - math.log(self.sigma_min)))

    _SHORTCUT_USES = ("sigma", "drift_coef", "diffusion")

    def _reverse_shortcut(self, t, probability_flow: bool):
        """a = 0, g^2 = 2 ln(sigma_max/sigma_min) sigma_min^2 ((sigma_max/sigma_min)^2)^t: one pow, one mul."""
        log_ratio = math.log(self.sigma_max) - math.log(self.sigma_min)
        c = -2 * log_ratio * self.sigma_min**2 * (0.5 if probability_flow else 1.0)
        return torch.zeros_like(t), c * ((self.sigma_max / self.sigma_min) ** 2) ** t

    def prior_std(self):
        return self.sigma_max

    def discretize_coefs(self, t, t_next, *, score_sde_tables: bool = False):
        if score_sde_tables:
            i = self.table_index(t)
            table = self.discrete_sigmas.to(t.device)
            sigma = table[i]
            adjacent = torch.where(i == 0, torch.zeros_like(sigma), table[(i - 1).clamp_min(0)])
        else:
            sigma = self.sigma(t)
            adjacent = torch.where(t_next > 0, self.sigma(t_next), torch.zeros_like(t_next))
        return torch.zeros_like(t), (sigma**2 - adjacent**2).clamp_min(0).sqrt()

    def time_map(self, t):
        return self.sigma(t)

    def sigma_bcast(self, t, x):
        return bcast(self.sigma(as_time(t, x)), x)
