"""Variance-preserving (DDPM) and sub-VP SDEs with linear beta(t) = beta_min + t (beta_max - beta_min)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SDE


class VPSDE(SDE):
    eps = 1e-3

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"beta_min, beta_max: need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        if beta_max / N >= 1:
            raise ValueError(f"N: score_sde's VP tables need beta_max / N < 1 (beta_i = beta(t_i) / N), got N={N}")
        self.beta_0, self.beta_1, self.N = float(beta_min), float(beta_max), int(N)
        self.discrete_betas = torch.linspace(beta_min / N, beta_max / N, N, dtype=torch.float64)
        self.alphas = 1.0 - self.discrete_betas

    def config(self):
        return {"beta_min": self.beta_0, "beta_max": self.beta_1, "N": self.N}

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    def log_mean_coeff(self, t: Tensor) -> Tensor:
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def mean_coef(self, t):
        return torch.exp(self.log_mean_coeff(t))

    def std(self, t):
        return torch.sqrt(-torch.expm1(2.0 * self.log_mean_coeff(t)))

    def alpha_bar(self, t):
        return torch.exp(2.0 * self.log_mean_coeff(t))

    def drift_coef(self, t):
        return -0.5 * self.beta(t)

    def diffusion(self, t):
        return torch.sqrt(self.beta(t))

    def _neg_beta(self, t: Tensor) -> Tensor:
        """-beta(t), exactly (negation commutes with rounding): one mul and one add."""
        return -self.beta_0 + t * (self.beta_0 - self.beta_1)

    _SHORTCUT_USES = ("beta", "drift_coef", "diffusion")

    def _reverse_shortcut(self, t, probability_flow: bool):
        """a = -beta/2; b = -beta (SDE) or -beta/2 = a (ODE): beta once, 3 ops."""
        nb = self._neg_beta(t)
        a = 0.5 * nb
        return a, a if probability_flow else nb

    def prior_std(self):
        return 1.0

    def _table_coefs(self, t):
        i = self.table_index(t).to("cpu")
        beta = self.discrete_betas[i].to(t.device)
        alpha = self.alphas[i].to(t.device)
        return alpha.sqrt() - 1, beta.sqrt()

    def corrector_alpha(self, t, t_next, *, score_sde_tables: bool) -> Tensor:
        """score_sde's Langevin-corrector alpha: alphas[floor(t (N-1)/T)] on its grid, else abar ratio."""
        if score_sde_tables:
            return self.alphas[self.table_index(t).to("cpu")].to(t.device)
        return self.alpha_bar(t) / self.alpha_bar(t_next)

    def time_map(self, t):
        return t * 999


class SubVPSDE(VPSDE):
    def std(self, t):
        return -torch.expm1(2.0 * self.log_mean_coeff(t))

    def diffusion(self, t):
        discount = -torch.expm1(-2 * self.beta_0 * t - (self.beta_1 - self.beta_0) * t**2)
        return torch.sqrt(self.beta(t) * discount)

    _SHORTCUT_USES = ("beta", "drift_coef", "diffusion")

    def _reverse_shortcut(self, t, probability_flow: bool):
        """a = -beta/2, g^2 = beta (1 - e^(-2 beta_0 t - (beta_1 - beta_0) t^2)): beta once."""
        nb = self._neg_beta(t)
        neg_g2 = nb * -torch.expm1(t * (-2 * self.beta_0 + t * (self.beta_0 - self.beta_1)))
        return 0.5 * nb, 0.5 * neg_g2 if probability_flow else neg_g2

    def discretize_coefs(self, t, t_next, *, score_sde_tables: bool = False):
        if score_sde_tables:
            return SDE._table_coefs(self, t)
        alpha = self.alpha_bar(t) / self.alpha_bar(t_next)
        G2 = (1 - self.alpha_bar(t)) ** 2 - alpha * (1 - self.alpha_bar(t_next)) ** 2
        return alpha.sqrt() - 1, G2.clamp_min(0).sqrt()

    def corrector_alpha(self, t, t_next, *, score_sde_tables: bool):
        return self.alpha_bar(t) / self.alpha_bar(t_next)
