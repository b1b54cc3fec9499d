"""Rectified flow (flow matching, SD3 / Flux): x_t = (1 - t) x_0 + t n, t in [0, 1], prior N(0, I).

The network predicts the velocity v = n - x_0 and the probability-flow ODE is dx/dt = v
(``sf.adapters.from_velocity``).  As an SDE of the family: mean_coef a = 1 - t, std s = t, and the
forward SDE with these marginals is

    f(t) = a'/a = -1 / (1 - t),   g(t)^2 = d(s^2)/dt - 2 f s^2 = 2t + 2t^2 / (1 - t) = 2t / (1 - t),

so ``reverse_coefs(t, probability_flow=True)`` = (-1/(1 - t), -t/(1 - t)) and, with the exact score
s = -(x + (1 - t) v) / t, the probability-flow drift a x + b s is v.

Where sampling starts and ends (both ends are singular for a *score*):

- t -> 0: std(0) = 0, the score -(x + (1 - t) v)/t blows up.  Sampling ends at ``eps`` and the
  samplers' closing Tweedie step x0 = (x + eps^2 s) / (1 - eps) = x - eps v is exactly the last
  Euler step eps -> 0 of dx/dt = v, so sampling does end at t = 0.  ``eps`` is diffusers'
  ``FlowMatchEulerDiscreteScheduler`` last sigma before its terminal 0: shift(shift(1/1000))
  (diffusers' sigma_min is the shifted 1/1000 training sigma, and ``set_timesteps`` shifts again).
- t -> 1: mean_coef(1) = 0, so the score at t = 1 is -x whatever the velocity: no sampler that
  reads a score can take a step from t = 1 (its drift there, x - E[x_0], is 0/0), and the forward
  SDE's drift and diffusion diverge there.  ``T`` (where sampling starts from the N(0, I) prior) is
  therefore shift(1 - 1/1000), the first sigma of diffusers' ``DPMSolverMultistepScheduler`` with
  ``use_flow_sigmas`` (which avoids t = 1 for the same reason).  N(0, I) is the exact law at t = 1;
  at T it is off by O(1 - T) (likelihood tests pass the exact p_T, as for VP).

``grid(steps)`` is diffusers' FlowMatch grid: uniform in the unshifted time u from u(T) = 1 - 1/1000
to u(eps) = shift(1/1000), mapped by t = shift u / (1 + (shift - 1) u) (SD3's shift).  It equals
``FlowMatchEulerDiscreteScheduler(shift=...).set_timesteps(sigmas=linspace(1 - 1/1000, sigma_min,
steps))`` and differs from its default grid (which starts at u = 1) by at most 1/1000 in u.
"""

from __future__ import annotations

import math

import torch

from .base import SDE

TRAIN_TIMESTEPS = 1000  # diffusers' num_train_timesteps: the grid ends 1/1000 from either end (in u)


def shift_time(u, shift: float):
    """SD3's resolution shift t = shift u / (1 + (shift - 1) u) of a float or a float64 tensor."""
    return shift * u / (1 + (shift - 1) * u)


def _float32(v: float) -> float:
    """v rounded to float32, as diffusers stores its training sigmas."""
    return float(torch.tensor(v, dtype=torch.float32))


class RectifiedFlow(SDE):
    """x_t = (1 - t) x_0 + t n on t in [eps, T] (module docstring for the ends), prior N(0, I).

    Args:
        shift: SD3's time shift (> 0; 1 = none, SD3 uses 3): the uniform grid and the training times
            are mapped by t = shift u / (1 + (shift - 1) u).
    """

    N = None  # no score_sde tables: sf.sample's "own grid" (steps == N) never applies

    def __init__(self, shift: float = 1.0):
        shift = float(shift)
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift: must be a finite number > 0, got {shift}")
        self.shift = shift
        # the unshifted range of the grid, as diffusers' FlowMatch schedulers
        self.u_max = 1.0 - 1.0 / TRAIN_TIMESTEPS
        self.u_min = _float32(shift_time(1.0 / TRAIN_TIMESTEPS, shift))  # FlowMatchEuler's sigma_min
        self.T = shift_time(self.u_max, shift)
        self.eps = shift_time(self.u_min, shift)

    def config(self):
        return {"shift": self.shift}

    def shift_time(self, u):
        """t(u) for the unshifted time u (float or float64 tensor)."""
        return shift_time(u, self.shift)

    def mean_coef(self, t):
        return 1 - t

    def std(self, t):
        return t

    def drift_coef(self, t):
        return -1 / (1 - t)

    def diffusion(self, t):
        return torch.sqrt(2 * t / (1 - t))

    _SHORTCUT_USES = ("drift_coef", "diffusion")

    def _reverse_shortcut(self, t, probability_flow: bool):
        """a = -1/(1 - t) = 1/(t - 1); b = -t/(1 - t) = t/(t - 1) (ODE) or twice that (SDE): 3-4 ops."""
        d = t - 1
        b = t / d
        return torch.reciprocal(d), b if probability_flow else 2.0 * b

    def marginal_rates(self, t):
        return -torch.ones_like(t), torch.ones_like(t)

    def prior_std(self):
        return 1.0

    def discretize_coefs(self, t, t_next, *, score_sde_tables: bool = False):
        """The exact transition t_next -> t: x_t = c x_next + G z, c = (1 - t)/(1 - t_next),
        G^2 = t^2 - c^2 t_next^2 (no score_sde tables for this SDE)."""
        return self.exact_transition(t, t_next)

    def grid(self, steps, device=None):
        """steps times from T to eps, uniform in the unshifted time u, then shifted (float64)."""
        u = torch.linspace(self.u_max, self.u_min, steps, dtype=torch.float64, device=device)
        return self.shift_time(u)
