"""Time grids T = t_0 > ... > t_{N-1} = eps compared by the quality suite's grid study (float64).

- ``uniform``: uniform in t (score_sde's grid; ``sf.sample``'s VE default, and its VP default
  before the quality suite).
- ``quadratic``: t = eps + (T - eps) (1 - i / (N - 1))^2, DPM-Solver's "time_quadratic"
  (``sf.sample``'s VP / sub-VP default).
- ``logsnr``: uniform in lambda = log(a / s), DPM-Solver's "logSNR" grid.
- ``karras``: Karras et al.'s rho = 7 spacing in sigma = s / a (EDM's grid, applied to any SDE).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..sampling import _grid

SCHEDULES = ("uniform", "quadratic", "logsnr", "karras")


def _invert(sde, values: Tensor, fn) -> Tensor:
    """Times whose fn(t) equals values, for fn monotone on [eps, T] (fine-grid interpolation)."""
    fine = torch.linspace(sde.eps, sde.T, 400_001, dtype=torch.float64)
    f = fn(fine)
    if f[0] > f[-1]:
        f, fine = f.flip(0), fine.flip(0)
    idx = torch.searchsorted(f, values).clamp(1, f.numel() - 1)
    w = (values - f[idx - 1]) / (f[idx] - f[idx - 1])
    return _ends(fine[idx - 1] + w * (fine[idx] - fine[idx - 1]), sde.T, sde.eps)


def _ends(t: Tensor, T: float, eps: float) -> Tensor:
    """t with its first and last entries exactly T and eps (no rounding at the ends)."""
    t[0], t[-1] = T, eps
    return t


def grid(sde, steps: int, schedule: str) -> Tensor:
    """``steps`` decreasing times from T to eps on the named schedule."""
    T, eps = float(sde.T), float(sde.eps)
    if steps < 2:
        return torch.full((max(steps, 0),), T, dtype=torch.float64)
    u = torch.linspace(0, 1, steps, dtype=torch.float64)
    if schedule in ("uniform", "quadratic"):
        return _grid(sde, steps, schedule, None, "cpu")[0]
    ends = torch.tensor([T, eps], dtype=torch.float64)
    if schedule == "logsnr":

        def lam(t):
            return torch.log(sde.mean_coef(t) / sde.std(t))

        lo, hi = lam(ends).tolist()
        return _invert(sde, lo + u * (hi - lo), lam)
    if schedule == "karras":

        def sigma(t):
            return sde.std(t) / sde.mean_coef(t)

        s_max, s_min = sigma(ends).tolist()
        rho = 7.0
        target = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        return _invert(sde, target, sigma)
    raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
