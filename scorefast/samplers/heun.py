"""Heun's 2nd-order method on the probability-flow ODE (EDM Algorithm 2 with churn on EDM).

Over the N-1 intervals between grid times: d = dx/dt at (x, t), Euler to t_{n+1}, then the trapezoid
correction with d' at (x_{n+1}, t_{n+1}); the closing Tweedie step is EDM's last Euler step
sigma_min -> 0, so heun costs 2(N-1) + 1 NFE.  On ``EDM``, ``s_churn``/``s_tmin``/``s_tmax``/``s_noise``
add EDM's stochastic churn: t_hat = t (1 + gamma), x_hat = x + sqrt(t_hat^2 - t^2) s_noise z.
"""

from __future__ import annotations

import math

import torch

from ..sde import EDM
from .base import Context
from .ode_euler import tweedie

NAME = "heun"
DRAWS = 1
DEFAULT_STEPS = 18
KIND = "ode"


def run(
    ctx: Context,
    x,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    denoise: bool = True,
):
    sde = ctx.sde
    if s_churn < 0:
        raise ValueError(f"s_churn: must be >= 0, got {s_churn}")
    if s_churn > 0 and not isinstance(sde, EDM):
        raise ValueError("s_churn: EDM's churn needs the EDM SDE (time = sigma)")
    times = ctx.times.tolist()
    N = len(times)
    # per interval: churned start t_hat, end t_next and the reverse-drift coefficients a x + b s at both
    t_hat = [t * (1 + (min(s_churn / (N - 1), math.sqrt(2) - 1) if s_tmin <= t <= s_tmax else 0.0)) for t in times[:-1]]
    a1, b1 = (v.tolist() for v in sde.reverse_coefs(torch.tensor(t_hat, dtype=torch.float64), probability_flow=True))
    a2, b2 = (
        v.tolist() for v in sde.reverse_coefs(torch.tensor(times[1:], dtype=torch.float64), probability_flow=True)
    )
    for n in range(N - 1):
        t_cur, t_next, th = times[n], times[n + 1], t_hat[n]
        if th > t_cur:
            x = ctx.update(x, [], noise=math.sqrt(th**2 - t_cur**2) * s_noise, n=n)
        # Euler x_e = x + h d with d = a1 x + b1 s1; then x + h (d + d2) / 2 with d2 = a2 x_e + b2 s2
        h = t_next - th
        s1 = ctx.score(x, th)
        x_euler = ctx.update(x, [(h * b1[n], s1)], x_coef=1 + h * a1[n], n=n)
        s2 = ctx.score(x_euler, t_next)
        terms = [(h / 2 * b1[n], s1), (h / 2 * a2[n], x_euler), (h / 2 * b2[n], s2)]
        x = ctx.update(x, terms, x_coef=1 + h / 2 * a1[n], n=n)
        x = ctx.step_done(n, x, th)
    return tweedie(ctx, x, denoise)
