"""Heun's 2nd-order method on the probability-flow ODE (EDM Algorithm 2 with churn on EDM).

Over the N-1 intervals between grid times: d = dx/dt at (x, t), Euler to t_{n+1}, then the trapezoid
correction with d' at (x_{n+1}, t_{n+1}); the closing Tweedie step is EDM's last Euler step
sigma_min -> 0, so heun costs 2(N-1) + 1 NFE.  On ``EDM``, ``s_churn``/``s_tmin``/``s_tmax``/``s_noise``
add EDM's stochastic churn: t_hat = t (1 + gamma), x_hat = x + sqrt(t_hat^2 - t^2) s_noise z.
"""

from __future__ import annotations

import math

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
    times = ctx.times
    N = len(times)
    for n in range(N - 1):
        t_cur, t_next = float(times[n]), float(times[n + 1])
        gamma = min(s_churn / (N - 1), math.sqrt(2) - 1) if s_tmin <= t_cur <= s_tmax else 0.0
        t_hat = t_cur * (1 + gamma)
        if gamma > 0:
            x = ctx.update(x, [], noise=math.sqrt(t_hat**2 - t_cur**2) * s_noise, n=n)
        th = ctx.t_vec(t_hat, x)
        d = sde.reverse_drift(x, th, ctx.score(x, th), probability_flow=True)
        h = t_next - t_hat
        x_euler = ctx.update(x, [(h, d)], n=n)
        tn = ctx.t_vec(t_next, x)
        d2 = sde.reverse_drift(x_euler, tn, ctx.score(x_euler, tn), probability_flow=True)
        x = ctx.update(x, [(h / 2, d), (h / 2, d2)], n=n)
        ctx.step_done(n, x, th)
    return tweedie(ctx, x, denoise)
