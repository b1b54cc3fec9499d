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

from .._checks import check_bool, check_choice, check_real
from .base import Context, Step
from .ode_euler import tweedie

NAME = "dpm_solver++"
DRAWS = 1
DEFAULT_STEPS = 20
KIND = "ode"
VARIANTS = ("2m", "2m-sde", "3m")


def validate(sde, *, variant, eta, s_noise, denoise) -> dict:
    """eta None becomes the variant's default (1 for 2m-sde, else 0)."""
    variant = check_choice("variant", variant, VARIANTS)
    eta = (1.0 if variant == "2m-sde" else 0.0) if eta is None else check_real("eta", eta, lo=0.0)
    if variant == "2m" and eta != 0:
        raise ValueError("eta: the 2m variant is deterministic; use variant='2m-sde' for eta > 0")
    return {
        "variant": variant,
        "eta": eta,
        "s_noise": check_real("s_noise", s_noise, lo=0.0),
        "denoise": check_bool("denoise", denoise),
    }


def run(ctx: Context, x, *, variant: str = "2m", eta: float | None = None, s_noise: float = 1.0, denoise: bool = True):
    eta = (1.0 if variant == "2m-sde" else 0.0) if eta is None else eta  # validated by ``validate``
    sde = ctx.sde
    times_t = ctx.times.to("cpu", torch.float64)
    a_t, s_t_all = sde.mean_coef(times_t), sde.std(times_t)
    lam = (a_t / s_t_all).log().tolist()
    history = 1 if variant in ("2m", "2m-sde") else 2  # earlier D's a step uses once warmed up
    a_all, s_all = a_t.tolist(), s_t_all.tolist()
    rows = [_coefs(variant, eta, s_noise, n, lam, a_all, s_all) for n in range(len(lam) - 1)]
    sched = ctx.table(rows)

    def step(n: Step, x, *earlier):
        """earlier: the previous steps' D, newest first (fewer in the first steps)."""
        t = ctx.time(n)
        D = ctx.denoised(x, n, ctx.score(x, t))
        cols = (*range(2 + len(earlier)), 4)  # x, D, the earlier D's in use, noise
        x = ctx.update_row(x, sched, n, [D, *earlier], cols=cols, noise=eta > 0)
        x = ctx.step_done(n, x, t, D)
        return (x, D, *earlier[: history - 1])

    N = len(lam)
    carry = ctx.steps(step, (x,), 0, min(history, N - 1))
    x = ctx.steps(step, carry, min(history, N - 1), N - 1)[0]
    return tweedie(ctx, x, denoise)


def _coefs(variant: str, eta: float, s_noise: float, n: int, lam, a_all, s_all) -> tuple[float, ...]:
    """Step n's (x, D, D_{n-1}, D_{n-2}, noise) coefficients, in double precision on the host."""
    h = lam[n + 1] - lam[n]
    h1 = lam[n] - lam[n - 1] if n >= 1 else None
    h2 = lam[n - 1] - lam[n - 2] if n >= 2 else None
    a_n, s_n, s_t = a_all[n + 1], s_all[n + 1], s_all[n]
    h_eta = h * (1 + eta)
    x_coef = s_n / s_t * math.exp(-eta * h)
    base = -math.expm1(-h_eta)
    terms = [a_n * base, 0.0, 0.0]
    if variant == "2m" or variant == "2m-sde":
        if h1 is not None and variant == "2m":
            r = h1 / h
            terms = [a_n * base * (1 + 1 / (2 * r)), -a_n * base / (2 * r), 0.0]
        elif h1 is not None:  # midpoint correction of k-diffusion's 2m-sde
            r = h1 / h
            c = 0.5 * base / r
            terms = [a_n * (base + c), -a_n * c, 0.0]
    else:
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        phi_3 = phi_2 / h_eta - 0.5
        if h2 is not None:
            r0, r1 = h1 / h, h2 / h
            # d1_0 = (D - D1)/r0, d1_1 = (D1 - D2)/r1; d1 = d1_0 + (d1_0 - d1_1) r0/(r0 + r1);
            # d2 = (d1_0 - d1_1)/(r0 + r1); x += phi_2 d1 - phi_3 d2 (expanded into D, D1, D2 weights)
            w = r0 / (r0 + r1)
            k = 1 / (r0 + r1)
            cD = (1 + w) / r0 * phi_2 - k / r0 * phi_3
            cD1 = (-(1 + w) / r0 - w / r1) * phi_2 + (k / r0 + k / r1) * phi_3
            cD2 = (w / r1) * phi_2 - (k / r1) * phi_3
            terms = [a_n * (base + cD), a_n * cD1, a_n * cD2]
        elif h1 is not None:
            r = h1 / h
            terms = [a_n * (base + phi_2 / r), -a_n * phi_2 / r, 0.0]
    noise = s_n * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise if eta > 0 else 0.0
    return (x_coef, *terms, noise)
