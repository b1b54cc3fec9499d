"""The SDE contract shared by VE, VP, sub-VP, EDM, DiscreteVP and RectifiedFlow (DESIGN.md "Time ...").

Shapes: x [B, ...]; t [B] in the SDE's own time (float64 or float32; schedules are computed in
float64 and cast once to x's dtype, so bf16/fp16 runs never see NaN/inf from them).
``sde(x, t) -> (drift [B, ...], diffusion [B])``; ``marginal_prob(x0, t) -> (mean, std [B])``;
``discretize(x, t, t_next) -> (f, G [B])`` of the forward step between two grid times.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from ..rng import STREAM_PRIOR, randn


def bcast(v: Tensor, x: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1] in x's dtype."""
    return v.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def as_time(t, x: Tensor | None = None, B: int | None = None, device=None) -> Tensor:
    """t (float, 0-d or [B]) -> float64 [B] on x's device."""
    B = B if B is not None else x.shape[0]
    device = device if device is not None else (x.device if x is not None else None)
    t = torch.as_tensor(t, dtype=torch.float64, device=device)
    return t.reshape(-1).expand(B) if t.numel() == 1 else t.reshape(B)


class SDE:
    """Base class: forward SDE dx = f(x, t) dt + g(t) dW on t in [eps, T]."""

    T: float = 1.0
    eps: float = 1e-3
    N: int = 1000
    time_map_name = "t"

    # -- to implement ---------------------------------------------------------------------
    def mean_coef(self, t: Tensor) -> Tensor:
        """a(t) [B] of x_t = a x_0 + s n (float64)."""
        raise NotImplementedError

    def std(self, t: Tensor) -> Tensor:
        """s(t) [B] (float64)."""
        raise NotImplementedError

    def drift_coef(self, t: Tensor) -> Tensor:
        """f(x, t) = drift_coef(t) * x for the linear SDEs here (float64 [B])."""
        raise NotImplementedError

    def diffusion(self, t: Tensor) -> Tensor:
        """g(t) [B] (float64)."""
        raise NotImplementedError

    def prior_std(self) -> float:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- derived --------------------------------------------------------------------------
    def sde(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        t = as_time(t, x)
        return bcast(self.drift_coef(t), x) * x, self.diffusion(t).to(x.dtype)

    def marginal_prob(self, x0: Tensor, t) -> tuple[Tensor, Tensor]:
        t = as_time(t, x0)
        return bcast(self.mean_coef(t), x0) * x0, self.std(t).to(x0.dtype)

    def alpha_bar(self, t: Tensor) -> Tensor:
        """a(t)**2: the signal fraction (VP: alphas_cumprod)."""
        return self.mean_coef(t) ** 2

    def prior_sampling(
        self,
        shape,
        *,
        seed: int | Tensor = 0,
        sample_ids: Tensor | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
        backend: str | None = None,
    ) -> Tensor:
        """x_T ~ N(0, prior_std**2 I) from stream 3, step 0 (DESIGN.md allocation table)."""
        z = randn(
            shape,
            seed=seed,
            step=0,
            stream=STREAM_PRIOR,
            sample_ids=sample_ids,
            device=device,
            dtype=dtype,
            backend=backend,
        )
        return z * self.prior_std()

    def prior_logp(self, z: Tensor) -> Tensor:
        """log N(z; 0, prior_std**2 I) per sample [B] (float64)."""
        D = z[0].numel()
        s2 = self.prior_std() ** 2
        z64 = z.reshape(z.shape[0], -1).double()
        return -0.5 * D * math.log(2 * math.pi * s2) - (z64 * z64).sum(1) / (2 * s2)

    def discretize(self, x: Tensor, t, t_next, *, score_sde_tables: bool = False) -> tuple[Tensor, Tensor]:
        """Forward step (f, G [B]) between grid times t > t_next: x_t ~ x_next + f + G z (reverse use)."""
        f_coef, G = self.discretize_coefs(as_time(t, x), as_time(t_next, x), score_sde_tables=score_sde_tables)
        return bcast(f_coef, x) * x, G.to(x.dtype)

    def discretize_coefs(self, t: Tensor, t_next: Tensor, *, score_sde_tables: bool = False) -> tuple[Tensor, Tensor]:
        """(f_coef, G), float64 [B], of ``discretize``: f = f_coef * x (every SDE here has a linear drift)."""
        if score_sde_tables:
            return self._table_coefs(t)
        alpha = self.alpha_bar(t) / self.alpha_bar(t_next)
        G2 = (1 - self.alpha_bar(t)) - alpha * (1 - self.alpha_bar(t_next))
        return alpha.sqrt() - 1, G2.clamp_min(0).sqrt()

    def exact_transition(self, t: Tensor, t_next: Tensor) -> tuple[Tensor, Tensor]:
        """(c - 1, G), float64 [B], of the exact forward transition x_t = c x_next + G z between any
        two times t > t_next of an SDE with affine marginals: c = a(t)/a(t_next), G^2 = s(t)^2 -
        c^2 s(t_next)^2; t_next <= 0 is the data end (a = 1, s = 0)."""
        end = t_next <= 0
        safe = torch.where(end, t, t_next)
        a_n = torch.where(end, torch.ones_like(t), self.mean_coef(safe))
        s_n = torch.where(end, torch.zeros_like(t), self.std(safe))
        c = self.mean_coef(t) / a_n
        return c - 1, (self.std(t) ** 2 - (c * s_n) ** 2).clamp_min(0).sqrt()

    def marginal_rates(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(da/dt, ds/dt), float64 [B], of x_t = a x_0 + s n: a' = f a and s' = (g^2 + 2 f s^2) / (2 s)
        for the linear SDE dx = f x dt + g dW.  The probability-flow velocity is a' E[x_0|x] + s' E[n|x]."""
        f, g, s = self.drift_coef(t), self.diffusion(t), self.std(t)
        return f * self.mean_coef(t), (g**2 + 2 * f * s**2) / (2 * s)

    def _table_coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Euler–Maruyama with dt = T/N: score_sde's base-class discretisation."""
        dt = self.T / self.N
        return self.drift_coef(t) * dt, self.diffusion(t) * math.sqrt(dt)

    # the schedule methods a class's ``_reverse_shortcut(t, probability_flow)`` formulas assume
    _SHORTCUT_USES: tuple[str, ...] = ()

    def reverse_coefs(self, t, *, probability_flow: bool = False) -> tuple[Tensor, Tensor]:
        """(a, b), float64 (t's shape), with reverse drift f - g^2 s (x 1/2 for the ODE) = a x + b s:
        a = f, b = -g^2 (SDE) or -g^2 / 2 (ODE), so g = sqrt(-b) for the SDE.  The generic path from
        ``drift_coef`` and ``diffusion``; a built-in SDE has a ``_reverse_shortcut`` with its shared
        subexpressions computed once (fewer ops in a captured step, same values up to rounding),
        taken while none of its ``_SHORTCUT_USES`` methods is overridden below it (a subclass with a
        schedule of its own gets the coefficients of its own methods)."""
        owner = _shortcut_owner(type(self))
        if owner is not None and all(getattr(type(self), n) is getattr(owner, n) for n in owner._SHORTCUT_USES):
            return self._reverse_shortcut(t, probability_flow)
        return self._generic_reverse_coefs(t, probability_flow)

    def _generic_reverse_coefs(self, t, probability_flow: bool) -> tuple[Tensor, Tensor]:
        """``reverse_coefs`` from ``drift_coef`` and ``diffusion`` alone."""
        g2 = self.diffusion(t) ** 2
        return self.drift_coef(t), g2 * -0.5 if probability_flow else -g2

    def table_index(self, t: Tensor) -> Tensor:
        """score_sde's table index floor(t (N - 1) / T)."""
        return (t * (self.N - 1) / self.T).long().clamp(0, self.N - 1)

    def time_map(self, t: Tensor) -> Tensor:
        """What the network sees for SDE time t (default: t itself)."""
        return t

    def grid(self, steps: int, device=None) -> Tensor:
        """steps grid times T = t_0 > ... > t_{steps-1} = eps, float64 (uniform in t)."""
        return torch.linspace(self.T, self.eps, steps, dtype=torch.float64, device=device)

    def reverse_drift(self, x: Tensor, t, score: Tensor, *, probability_flow: bool = False) -> Tensor:
        """f - g^2 s (reverse SDE) or f - g^2 s / 2 (probability-flow ODE), in x's dtype."""
        t = as_time(t, x)
        g2 = self.diffusion(t) ** 2 * (0.5 if probability_flow else 1.0)
        return bcast(self.drift_coef(t), x) * x - bcast(g2, x) * score

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "alphas_cumprod")
        return f"{type(self).__name__}({args})"


@functools.cache
def _shortcut_owner(kind: type) -> type | None:
    """The nearest class of ``kind``'s MRO that defines ``_reverse_shortcut`` (None: the generic path)."""
    return next((c for c in kind.__mro__ if "_reverse_shortcut" in vars(c)), None)
