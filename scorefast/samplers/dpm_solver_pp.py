"""DPM-Solver++ (Lu et al. 2022): 2M, 2M-SDE and 3M(-SDE) multistep solvers in data prediction.

With lambda = log(a / s) (x_t = a x_0 + s n), h = lambda_next - lambda and D the Tweedie x0:
x_next = (s_next / s) e^{-eta h} x + a_next [(1 - e^{-h (1 + eta)}) D + corrections]
         + s_next sqrt(1 - e^{-2 eta h}) z,
k-diffusion's ``sample_dpmpp_2m`` / ``_2m_sde`` (midpoint) / ``_3m_sde`` when a = 1, over the N-1
intervals between grid times, then the Tweedie step.  Noise: per-step Philox draws (a documented
deviation from k-diffusion's default Brownian tree).
"""

from __future__ import annotations

import math

import torch

from .base import Context
from .ode_euler import tweedie

NAME = "dpm_solver++"
DRAWS = 1
DEFAULT_STEPS = 20
KIND = "ode"
VARIANTS = ("2m", "2m-sde", "3m")


def run(ctx: Context, x, *, variant: str = "2m", eta: float | None = None, s_noise: float = 1.0, denoise: bool = True):
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    eta = (1.0 if variant == "2m-sde" else 0.0) if eta is None else float(eta)
    if eta < 0:
        raise ValueError(f"eta: must be >= 0, got {eta}")
    if variant == "2m" and eta != 0:
        raise ValueError("eta: the 2m variant is deterministic; use variant='2m-sde' for eta > 0")
    sde = ctx.sde
    times_t = ctx.times.to("cpu", torch.float64)
    a_t, s_t_all = sde.mean_coef(times_t), sde.std(times_t)
    lam = (a_t / s_t_all).log().tolist()
    a_all, s_all, times = a_t.tolist(), s_t_all.tolist(), times_t.tolist()
    D1 = D2 = None
    h1 = h2 = None
    for n in range(len(times) - 1):
        t = times[n]
        D = ctx.denoised(x, t, ctx.score(x, t))
        h = lam[n + 1] - lam[n]
        a_n, s_n, s_t = a_all[n + 1], s_all[n + 1], s_all[n]
        h_eta = h * (1 + eta)
        x_coef = s_n / s_t * math.exp(-eta * h)
        base = -math.expm1(-h_eta)
        terms = []
        if variant == "2m" or variant == "2m-sde":
            if D1 is None:
                terms = [(a_n * base, D)]
            elif variant == "2m":
                r = h1 / h
                terms = [(a_n * base * (1 + 1 / (2 * r)), D), (-a_n * base / (2 * r), D1)]
            else:  # midpoint correction of k-diffusion's 2m-sde
                r = h1 / h
                c = 0.5 * base / r
                terms = [(a_n * (base + c), D), (-a_n * c, D1)]
        else:
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            phi_3 = phi_2 / h_eta - 0.5
            if D2 is not None:
                r0, r1 = h1 / h, h2 / h
                # d1_0 = (D - D1)/r0, d1_1 = (D1 - D2)/r1; d1 = d1_0 + (d1_0 - d1_1) r0/(r0 + r1);
                # d2 = (d1_0 - d1_1)/(r0 + r1); x += phi_2 d1 - phi_3 d2 (expanded into D, D1, D2 weights)
                w = r0 / (r0 + r1)
                k = 1 / (r0 + r1)
                cD = (1 + w) / r0 * phi_2 - k / r0 * phi_3
                cD1 = (-(1 + w) / r0 - w / r1) * phi_2 + (k / r0 + k / r1) * phi_3
                cD2 = (w / r1) * phi_2 - (k / r1) * phi_3
                terms = [(a_n * (base + cD), D), (a_n * cD1, D1), (a_n * cD2, D2)]
            elif D1 is not None:
                r = h1 / h
                terms = [(a_n * (base + phi_2 / r), D), (-a_n * phi_2 / r, D1)]
            else:
                terms = [(a_n * base, D)]
        noise = s_n * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise if eta > 0 else 0.0
        x = ctx.update(x, terms, x_coef=x_coef, noise=noise, n=n)
        x = ctx.step_done(n, x, t, D)
        D1, D2 = D, D1
        h1, h2 = h, h1
    return tweedie(ctx, x, denoise)
