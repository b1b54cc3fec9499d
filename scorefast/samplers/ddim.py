"""DDIM (Song et al. 2021) for any SDE with x_t = a(t) x_0 + s(t) n, eta in [0, 1].

x0 = (x + s_t^2 score) / a_t, eps = -s_t score; x_next = a_n x0 + sqrt(s_n^2 - sig^2) eps + sig z with
sig = eta * (s_n / s_t) * sqrt(s_t^2 - a_t^2 s_n^2 / a_n^2).  The step from eps to the data end
(a = 1, s = 0) returns x0.
"""

from __future__ import annotations

import torch

from .base import Context
from .reverse_diffusion import next_time

NAME = "ddim"
DRAWS = 1
DEFAULT_STEPS = 50
KIND = "sde"


def run(ctx: Context, x, *, eta: float = 0.0, denoise: bool = True):
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta: must lie in [0, 1], got {eta}")
    sde = ctx.sde
    N = len(ctx.times)
    for n in range(N):
        t = ctx.t_vec(ctx.times[n], x)
        t_next = next_time(ctx, n, x)
        s = ctx.score(x, t)
        a_t, s_t = sde.mean_coef(t), sde.std(t)
        end = t_next <= 0
        a_n = torch.where(end, torch.ones_like(t), sde.mean_coef(t_next))
        s_n = torch.where(end, torch.zeros_like(t), sde.std(t_next))
        sig = eta * (s_n / s_t) * torch.sqrt((s_t**2 - a_t**2 * s_n**2 / a_n**2).clamp_min(0))
        direction = torch.sqrt((s_n**2 - sig**2).clamp_min(0))
        # x_next = (a_n / a_t) x + (a_n s_t^2 / a_t - direction * s_t) score + sig z
        x_coef = a_n / a_t
        s_coef = a_n * s_t**2 / a_t - direction * s_t
        last = denoise and n == N - 1
        noisy = eta > 0 and not last
        x = ctx.update(
            x, [(s_coef.to(x.dtype), s)], x_coef=x_coef.to(x.dtype), noise=sig.to(x.dtype) if noisy else 0.0, n=n
        )
        ctx.step_done(n, x, t)
    return x
