"""Heun's 2nd-order method on the probability-flow ODE (EDM Algorithm 2 with churn on EDM).

Over the N-1 intervals between grid times: d = dx/dt at (x, t), Euler to t_{n+1}, then the trapezoid
correction with d' at (x_{n+1}, t_{n+1}); the closing Tweedie step is EDM's last Euler step
sigma_min -> 0, so heun costs 2(N-1) + 1 NFE.  On ``EDM``, ``s_churn``/``s_tmin``/``s_tmax``/``s_noise``
add EDM's stochastic churn: t_hat = t (1 + gamma), x_hat = x + sqrt(t_hat^2 - t^2) s_noise z.
"""

from __future__ import annotations

import math

import torch

from .._checks import check_bool, check_real
from ..sde import EDM
from .base import Context, Step
from .ode_euler import tweedie

NAME = "heun"
DRAWS = 1
DEFAULT_STEPS = 18
KIND = "ode"


def validate(sde, *, s_churn, s_tmin, s_tmax, s_noise, denoise) -> dict:
    s_churn = check_real("s_churn", s_churn, lo=0.0)
    if s_churn > 0 and not isinstance(sde, EDM):
        raise ValueError("s_churn: EDM's churn needs the EDM SDE (time = sigma)")
    return {
        "s_churn": s_churn,
        "s_tmin": check_real("s_tmin", s_tmin, lo=0.0),
        "s_tmax": check_real("s_tmax", s_tmax, lo=0.0, allow_inf=True),
        "s_noise": check_real("s_noise", s_noise, lo=0.0),
        "denoise": check_bool("denoise", denoise),
    }


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
    times = ctx.times.tolist()
    N = len(times)
    # per interval: churned start t_hat, end t_next and the reverse-drift coefficients a x + b s at both
    gamma = min(s_churn / (N - 1), math.sqrt(2) - 1)
    t_hat = [t * (1 + (gamma if s_tmin <= t <= s_tmax else 0.0)) for t in times[:-1]]
    th, t_next = torch.tensor(t_hat, dtype=torch.float64), torch.tensor(times[1:], dtype=torch.float64)
    a1, b1 = sde.reverse_coefs(th, probability_flow=True)
    a2, b2 = sde.reverse_coefs(t_next, probability_flow=True)
    t_cur = torch.tensor(times[:-1], dtype=torch.float64)
    churn = (th**2 - t_cur**2).clamp_min(0).sqrt() * s_noise
    h = t_next - th
    # Euler x_e = x + h d with d = a1 x + b1 s1; then x + h (d + d2) / 2 with d2 = a2 x_e + b2 s2
    sched = ctx.table(
        torch.stack([th, t_next, churn, 1 + h * a1, h * b1, 1 + h / 2 * a1, h / 2 * b1, h / 2 * a2, h / 2 * b2], 1)
    )
    has_churn = bool((churn > 0).any())
    starts, ends = ctx.time_table(th), ctx.time_table(t_next)

    def step(n: Step, x):
        th = starts.at(n)
        if has_churn and (isinstance(n, torch.Tensor) or sched.host[n][2] > 0):
            x = ctx.update_row(x, sched, n, [], cols=(1.0, 2))
        s1 = ctx.score(x, th)
        x_euler = ctx.update_row(x, sched, n, [s1], cols=(3, 4, 0.0), noise=False)
        s2 = ctx.score(x_euler, ends.at(n))
        x = ctx.update_row(x, sched, n, [s1, x_euler, s2], cols=(5, 6, 7, 8, 0.0), noise=False)
        return ctx.step_done(n, x, th)

    return tweedie(ctx, ctx.steps(step, x, 0, N - 1), denoise)
