"""k-diffusion's samplers (``k_diffusion.sampling``) with the same signatures, on the fused ops.

``model(x, sigma [B], **extra_args) -> denoised`` as in k-diffusion; ``sigmas`` [n + 1] ending in
0.  Each update is one ``sf.ops.fused_update`` (x_coef x + sum c_j t_j + noise z, z made in-kernel).

Noise: unless a ``noise_sampler(sigma, sigma_next)`` is passed, each call draws one 64-bit seed
from torch's default CPU generator (so ``torch.manual_seed`` governs it, as users expect) and the
noise of step i is the Philox stream's (stream 0, sample ids arange(B), k = i): sample b's noise
does not depend on the batch.  Deviations from k-diffusion, on purpose: ``sample_dpmpp_2m_sde``
and ``_3m_sde`` default to that per-step Philox noise instead of a ``BrownianTreeNoiseSampler``
(pass one to get k-diffusion's behaviour); ``sample_euler``, ``sample_heun`` and ``sample_dpm_2``
draw churn noise only when churn is on and also accept a ``noise_sampler``; ``sample_lms``
integrates its Lagrange coefficients exactly (k-diffusion: ``scipy.integrate.quad``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import trange

from ..rng import philox_seed
from ._fused import FusedUpdater

__all__ = [
    "append_zero",
    "get_ancestral_step",
    "get_sigmas_exponential",
    "get_sigmas_karras",
    "get_sigmas_polyexponential",
    "sample_dpm_2",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lms",
    "to_d",
]


# -- schedules (identical arithmetic to k-diffusion) -----------------------------------------
def append_zero(x: Tensor) -> Tensor:
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device="cpu") -> Tensor:
    """Karras et al. (2022)'s schedule: n sigmas from sigma_max to sigma_min, then 0."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas).to(device)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, device="cpu") -> Tensor:
    """n sigmas uniform in log sigma, then 0."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device).exp()
    return append_zero(sigmas)


def get_sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, device="cpu") -> Tensor:
    """n sigmas polynomial (degree rho) in log sigma, then 0."""
    ramp = torch.linspace(1, 0, n, device=device) ** rho
    sigmas = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    return append_zero(sigmas)


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """The Karras ODE derivative (x - D(x)) / sigma."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return (x - denoised) / sigma.reshape(*sigma.shape, *([1] * (x.dim() - sigma.dim())))


def get_ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """(sigma_down, sigma_up) of an ancestral step from sigma_from to sigma_to."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


# -- shared plumbing --------------------------------------------------------------------------
class _Run:
    """Per-call state: the checked inputs, the Philox seed, and one fused update."""

    def __init__(self, model, x, sigmas, extra_args, noise_sampler):
        if not callable(model):
            raise TypeError("model: must be callable as model(x, sigma, **extra_args)")
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
            raise TypeError("x: expected a floating-point tensor [B, ...]")
        sigmas = torch.as_tensor(sigmas)
        if sigmas.dim() != 1 or sigmas.numel() < 2:
            raise ValueError(f"sigmas: expected a 1-d schedule of at least 2 values, got shape {tuple(sigmas.shape)}")
        s = sigmas.detach().double().cpu()
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise ValueError("sigmas: must be finite and >= 0")
        self.model, self.sigmas = model, sigmas
        self.s = s.tolist()  # host floats for the coefficients (k-diffusion reads them too)
        self.extra = {} if extra_args is None else extra_args
        self.s_in = x.new_ones([x.shape[0]])
        self.noise_sampler = noise_sampler
        self.seed = philox_seed() if noise_sampler is None else 0
        self.fused = FusedUpdater()

    def denoise(self, x: Tensor, i_or_sigma) -> Tensor:
        sigma = self.sigmas[i_or_sigma] if isinstance(i_or_sigma, int) else i_or_sigma
        return self.model(x, sigma * self.s_in, **self.extra)

    def update(
        self, x: Tensor, terms, *, x_coef: float = 1.0, noise: float = 0.0, step: int = 0, sigma=None, sigma_next=None
    ) -> Tensor:
        """x_coef x + sum c t + noise z with z the Philox draw of step ``step`` or the noise sampler's."""
        terms = [(float(c), t) for c, t in terms]
        if noise and self.noise_sampler is not None:
            terms.append((float(noise), self.noise_sampler(sigma, sigma_next)))
            noise = 0.0
        return self.fused(x, terms, x_coef=x_coef, noise=noise, seed=self.seed, step=step)


def _callback(callback, x, i, sigma, sigma_hat, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def _churn(run: _Run, x, i, s_churn, s_tmin, s_tmax, s_noise):
    """Karras' churn: (x with noise added, sigma_hat as a tensor, sigma_hat as a float)."""
    n = len(run.s) - 1
    sig = run.s[i]
    gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sig <= s_tmax else 0.0
    sigma_hat = run.sigmas[i] * (gamma + 1)
    hat = sig * (gamma + 1)
    if gamma > 0:
        x = run.update(
            x, [], noise=s_noise * (hat**2 - sig**2) ** 0.5, step=i, sigma=run.sigmas[i], sigma_next=run.sigmas[i + 1]
        )
    return x, sigma_hat, hat


def _euler(run: _Run, x, denoised, from_: float, to: float, **noise) -> Tensor:
    """x + (x - D) / from_ * (to - from_) (+ noise), one fused pass."""
    r = (to - from_) / from_
    return run.update(x, [(-r, denoised)], x_coef=1 + r, **noise)


# -- samplers ---------------------------------------------------------------------------------
@torch.no_grad()
def sample_euler(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
    noise_sampler=None,
):
    """Karras et al. (2022) Algorithm 2 with Euler steps."""
    run = _Run(model, x, sigmas, extra_args, noise_sampler)
    for i in trange(len(run.s) - 1, disable=disable):
        x, sigma_hat, hat = _churn(run, x, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = run.denoise(x, sigma_hat)
        _callback(callback, x, i, run.sigmas[i], sigma_hat, denoised)
        x = _euler(run, x, denoised, hat, run.s[i + 1])
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None
):
    """Ancestral sampling with Euler steps."""
    run = _Run(model, x, sigmas, extra_args, noise_sampler)
    for i in trange(len(run.s) - 1, disable=disable):
        denoised = run.denoise(x, i)
        down, up = get_ancestral_step(run.s[i], run.s[i + 1], eta=eta)
        _callback(callback, x, i, run.sigmas[i], run.sigmas[i], denoised)
        noise = s_noise * up if run.s[i + 1] > 0 else 0.0
        x = _euler(
            run, x, denoised, run.s[i], down, noise=noise, step=i, sigma=run.sigmas[i], sigma_next=run.sigmas[i + 1]
        )
    return x


@torch.no_grad()
def sample_heun(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
    noise_sampler=None,
):
    """Karras et al. (2022) Algorithm 2 (Heun steps, Euler into sigma = 0)."""
    run = _Run(model, x, sigmas, extra_args, noise_sampler)
    for i in trange(len(run.s) - 1, disable=disable):
        x, sigma_hat, hat = _churn(run, x, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = run.denoise(x, sigma_hat)
        _callback(callback, x, i, run.sigmas[i], sigma_hat, denoised)
        nxt = run.s[i + 1]
        if nxt == 0:
            x = _euler(run, x, denoised, hat, nxt)
        else:
            x_2 = _euler(run, x, denoised, hat, nxt)
            denoised_2 = run.denoise(x_2, i + 1)
            # x + dt/2 (d + d_2), d = (x - D)/hat, d_2 = (x_2 - D_2)/nxt
            dt = nxt - hat
            a, b = dt / (2 * hat), dt / (2 * nxt)
            x = run.update(x, [(-a, denoised), (b, x_2), (-b, denoised_2)], x_coef=1 + a)
    return x


@torch.no_grad()
def sample_dpm_2(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
    noise_sampler=None,
):
    """DPM-Solver-2-like steps with Karras' churn (midpoint in log sigma)."""
    run = _Run(model, x, sigmas, extra_args, noise_sampler)
    for i in trange(len(run.s) - 1, disable=disable):
        x, sigma_hat, hat = _churn(run, x, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = run.denoise(x, sigma_hat)
        _callback(callback, x, i, run.sigmas[i], sigma_hat, denoised)
        nxt = run.s[i + 1]
        if nxt == 0:
            x = _euler(run, x, denoised, hat, nxt)
        else:
            sigma_mid = sigma_hat.log().lerp(run.sigmas[i + 1].log(), 0.5).exp()
            mid = math.exp(0.5 * (math.log(hat) + math.log(nxt)))
            x_2 = _euler(run, x, denoised, hat, mid)
            denoised_2 = run.denoise(x_2, sigma_mid)
            c = (nxt - hat) / mid  # x + d_2 (nxt - hat), d_2 = (x_2 - D_2) / mid
            x = run.update(x, [(c, x_2), (-c, denoised_2)])
    return x


def _lms_coeff(order: int, t: list[float], i: int, j: int) -> float:
    """int_{t_i}^{t_{i+1}} of the Lagrange basis polynomial j over t_i, ..., t_{i-order+1}, exactly."""
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-t[i - k], 1.0]) / (t[i - j] - t[i - k])
    integral = poly.integ()
    return float(integral(t[i + 1]) - integral(t[i]))


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep (Adams-Bashforth in sigma) of the given order."""
    run = _Run(model, x, sigmas, extra_args, None)
    ds: list[Tensor] = []
    for i in trange(len(run.s) - 1, disable=disable):
        denoised = run.denoise(x, i)
        ds.append(run.update(x, [(-1 / run.s[i], denoised)], x_coef=1 / run.s[i]))  # d = (x - D) / sigma
        if len(ds) > order:
            ds.pop(0)
        _callback(callback, x, i, run.sigmas[i], run.sigmas[i], denoised)
        cur = min(i + 1, order)
        coeffs = [_lms_coeff(cur, run.s, i, j) for j in range(cur)]
        x = run.update(x, list(zip(coeffs, reversed(ds))))
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M)."""
    run = _Run(model, x, sigmas, extra_args, None)
    old = None
    for i in trange(len(run.s) - 1, disable=disable):
        denoised = run.denoise(x, i)
        _callback(callback, x, i, run.sigmas[i], run.sigmas[i], denoised)
        sig, nxt = run.s[i], run.s[i + 1]
        if nxt == 0:
            x = denoised.clone() if old is None else run.update(x, [(1.0, denoised)], x_coef=0.0)
        else:
            h = math.log(sig) - math.log(nxt)
            c = -math.expm1(-h)
            if old is None:
                x = run.update(x, [(c, denoised)], x_coef=nxt / sig)
            else:
                r = (math.log(run.s[i - 1]) - math.log(sig)) / h
                x = run.update(x, [(c * (1 + 1 / (2 * r)), denoised), (-c / (2 * r), old)], x_coef=nxt / sig)
        old = denoised
    return x


def _sde_noise_coef(nxt: float, h: float, eta: float, s_noise: float) -> float:
    return nxt * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    eta=1.0,
    s_noise=1.0,
    noise_sampler=None,
    solver_type="midpoint",
):
    """DPM-Solver++(2M) SDE (per-step Philox noise unless a noise_sampler is given)."""
    if solver_type not in {"heun", "midpoint"}:
        raise ValueError("solver_type: must be 'heun' or 'midpoint'")
    run = _Run(model, x, sigmas, extra_args, noise_sampler)
    old, h_last = None, None
    for i in trange(len(run.s) - 1, disable=disable):
        denoised = run.denoise(x, i)
        _callback(callback, x, i, run.sigmas[i], run.sigmas[i], denoised)
        sig, nxt = run.s[i], run.s[i + 1]
        h = None
        if nxt == 0:
            x = denoised
        else:
            h = math.log(sig) - math.log(nxt)
            eta_h = eta * h
            c = -math.expm1(-h - eta_h)
            terms = [(c, denoised)]
            if old is not None:
                r = h_last / h
                k = (c / (-h - eta_h) + 1) * (1 / r) if solver_type == "heun" else 0.5 * c * (1 / r)
                terms += [(k, denoised), (-k, old)]
            noise = _sde_noise_coef(nxt, h, eta, s_noise) if eta else 0.0
            x = run.update(
                x,
                terms,
                x_coef=nxt / sig * math.exp(-eta_h),
                noise=noise,
                step=i,
                sigma=run.sigmas[i],
                sigma_next=run.sigmas[i + 1],
            )
        old, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None
):
    """DPM-Solver++(3M) SDE (per-step Philox noise unless a noise_sampler is given)."""
    run = _Run(model, x, sigmas, extra_args, noise_sampler)
    d_1 = d_2 = None
    h_1 = h_2 = None
    for i in trange(len(run.s) - 1, disable=disable):
        denoised = run.denoise(x, i)
        _callback(callback, x, i, run.sigmas[i], run.sigmas[i], denoised)
        sig, nxt = run.s[i], run.s[i + 1]
        h = None
        if nxt == 0:
            x = denoised
        else:
            h = math.log(sig) - math.log(nxt)
            h_eta = h * (eta + 1)
            terms = [(-math.expm1(-h_eta), denoised)]
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                # d1_0 = (D - D1)/r0, d1_1 = (D1 - D2)/r1, d1 = d1_0 + (d1_0 - d1_1) r0/(r0+r1),
                # d2 = (d1_0 - d1_1)/(r0+r1); x += phi_2 d1 - phi_3 d2, as a combination of D, D1, D2
                phi_3 = phi_2 / h_eta - 0.5
                a = phi_2 * (1 + r0 / (r0 + r1)) - phi_3 / (r0 + r1)  # coefficient of d1_0
                b = -phi_2 * r0 / (r0 + r1) + phi_3 / (r0 + r1)  # coefficient of d1_1
                terms += [(a / r0, denoised), (-a / r0 + b / r1, d_1), (-b / r1, d_2)]
            elif h_1 is not None:
                r = h_1 / h
                terms += [(phi_2 / r, denoised), (-phi_2 / r, d_1)]
            noise = nxt * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise if eta else 0.0
            x = run.update(
                x,
                terms,
                x_coef=math.exp(-h_eta),
                noise=noise,
                step=i,
                sigma=run.sigmas[i],
                sigma_next=run.sigmas[i + 1],
            )
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
    return x
