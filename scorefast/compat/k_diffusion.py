"""k-diffusion's samplers (``k_diffusion.sampling``) with the same signatures, on the fused ops.

Every sampler of k-diffusion 0.1.1.post1 is here (euler, euler_ancestral, heun, dpm_2,
dpm_2_ancestral, lms, dpm_fast, dpm_adaptive, dpmpp_2s_ancestral, dpmpp_sde, dpmpp_2m,
dpmpp_2m_sde, dpmpp_3m_sde) with its keyword arguments and callback keys, the ``get_sigmas_*``
schedules and the helpers people import (``to_d``, ``get_ancestral_step``, ``append_zero``,
``default_noise_sampler``, ``BrownianTreeNoiseSampler``, ``BatchedBrownianTree``,
``linear_multistep_coeff``).

``model(x, sigma [B], **extra_args) -> denoised`` as in k-diffusion; ``sigmas`` [n + 1] ending in
0.  Each update is one ``sf.ops.fused_update`` (x_coef x + sum c_j t_j + noise z, z made in-kernel).

Noise: unless a ``noise_sampler(sigma, sigma_next)`` is passed, each call draws one 64-bit seed
from torch's default CPU generator (so ``torch.manual_seed`` governs it, as users expect) and the
noise of draw j of step i is the Philox stream's (stream 0, sample ids arange(B), k = i S + j, S the
sampler's draws per step: 2 for ``sample_dpmpp_sde``, else 1): sample b's noise does not depend on
the batch.  Any callable ``noise_sampler`` works, k-diffusion's ``BrownianTreeNoiseSampler`` and
ours included.  Deviations from k-diffusion, on purpose: ``sample_dpmpp_sde``, ``sample_dpmpp_2m_sde``
and ``_3m_sde`` default to that per-step Philox noise instead of a ``BrownianTreeNoiseSampler`` (pass
one to get k-diffusion's behaviour); ``sample_euler``, ``sample_heun`` and ``sample_dpm_2`` draw churn
noise only when churn is on and also accept a ``noise_sampler``; ``sample_lms`` integrates its
Lagrange coefficients exactly (k-diffusion: ``scipy.integrate.quad``); ``sample_dpm_adaptive``
controls its error per sample (k-diffusion: one norm over the whole batch); steps that draw no
noise draw none (k-diffusion's ``dpm_fast`` / ``dpm_adaptive`` call ``torch.randn_like`` even at
eta = 0).  Bad arguments raise ``ValueError``/``TypeError`` naming the argument.
"""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm, trange

from .._checks import check_finite_scalar
from ..rng import philox_seed
from . import _kd_dpm_solver
from ._fused import FusedUpdater

__all__ = [
    "BatchedBrownianTree",
    "BrownianTreeNoiseSampler",
    "append_zero",
    "default_noise_sampler",
    "get_ancestral_step",
    "get_sigmas_exponential",
    "get_sigmas_karras",
    "get_sigmas_polyexponential",
    "get_sigmas_vp",
    "linear_multistep_coeff",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpm_adaptive",
    "sample_dpm_fast",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde",
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


def get_sigmas_vp(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3, device="cpu") -> Tensor:
    """n sigmas of the continuous VP SDE at t = linspace(1, eps_s, n), then 0:
    sigma = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    t = torch.linspace(1, eps_s, n, device=device)
    sigmas = torch.sqrt(torch.exp(beta_d * t**2 / 2 + beta_min * t) - 1)
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


def default_noise_sampler(x: Tensor):
    """k-diffusion's default: ``noise_sampler(sigma, sigma_next) -> torch.randn_like(x)`` (torch's
    global generator).  scorefast's samplers do not use it unless passed: they draw Philox noise."""
    return lambda sigma, sigma_next: torch.randn_like(x)


def _torchsde():
    try:
        import torchsde
    except ImportError as e:  # pragma: no cover - torchsde is in the test extra
        raise ImportError(
            "BrownianTreeNoiseSampler needs torchsde (pip install torchsde), as k-diffusion's does"
        ) from e
    return torchsde


class BatchedBrownianTree:
    """Brownian motion W on [t0, t1] from ``torchsde.BrownianTree``, k-diffusion's class re-made.

    ``seed``: an int (one tree shaped like x; default: drawn with ``torch.randint`` from torch's
    global generator, as k-diffusion does) or a list of B ints (one tree per sample, shaped like
    x[0], stacked).  ``tree(ta, tb)`` is W(tb) - W(ta), in either order of ta and tb.  For the same
    seeds it returns exactly what k-diffusion's ``BatchedBrownianTree`` returns.  Extra keyword
    arguments (``w0``, ``tol``, ``cache_size``, ...) go to ``torchsde.BrownianTree``.
    """

    def __init__(self, x: Tensor, t0, t1, seed=None, **kwargs):
        torchsde = _torchsde()
        self.sign = 1 if t0 < t1 else -1
        lo, hi = (t0, t1) if self.sign == 1 else (t1, t0)
        w0 = kwargs.pop("w0", None)
        w0 = torch.zeros_like(x) if w0 is None else w0
        if seed is None:
            seed = torch.randint(0, 2**63 - 1, []).item()
        if isinstance(seed, Tensor) and seed.dim() == 0:
            seed = int(seed)
        self.batched = not isinstance(seed, numbers.Integral)
        if self.batched:
            seed = list(seed)
            if len(seed) != x.shape[0]:
                raise ValueError(f"seed: expected one seed per sample ({x.shape[0]}), got {len(seed)}")
            w0 = w0[0]
        else:
            seed = [seed]
        self.trees = [torchsde.BrownianTree(lo, w0, hi, entropy=s, **kwargs) for s in seed]

    def __call__(self, ta, tb) -> Tensor:
        sign = self.sign * (1 if ta < tb else -1)
        lo, hi = (ta, tb) if ta < tb else (tb, ta)
        w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        return w if self.batched else w[0]


class BrownianTreeNoiseSampler:
    """A noise sampler on a Brownian tree over [sigma_min, sigma_max], k-diffusion's class re-made.

    ``sampler(sigma, sigma_next)`` is (W(t') - W(t)) / sqrt|t' - t| with t = transform(sigma): unit
    normals, correlated between overlapping intervals as the SDE's Brownian motion is.  ``seed``:
    an int or a list of B ints (one tree per sample); same seeds, same noise as k-diffusion's.
    Pass it as ``noise_sampler=`` to get k-diffusion's default noise in ``sample_dpmpp_sde`` /
    ``sample_dpmpp_2m_sde`` / ``sample_dpmpp_3m_sde``.
    """

    def __init__(self, x: Tensor, sigma_min, sigma_max, seed=None, transform=lambda sigma: sigma):
        self.transform = transform
        t0 = transform(torch.as_tensor(sigma_min))
        t1 = transform(torch.as_tensor(sigma_max))
        self.tree = BatchedBrownianTree(x, t0, t1, seed)

    def __call__(self, sigma, sigma_next) -> Tensor:
        ta = self.transform(torch.as_tensor(sigma))
        tb = self.transform(torch.as_tensor(sigma_next))
        return self.tree(ta, tb) / (tb - ta).abs().sqrt()


# -- argument checks --------------------------------------------------------------------------
def _real(name: str, v, *, positive: bool = False, nonneg: bool = False) -> float:
    """A finite real (a Python number or a one-element tensor, e.g. a model's ``sigma_min`` buffer)."""
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name}: expected a number, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    v = check_finite_scalar(name, v, positive=positive)
    if nonneg and v < 0:
        raise ValueError(f"{name}: must be >= 0, got {v}")
    return v


def _noise_args(eta, s_noise) -> tuple[float, float]:
    return _real("eta", eta, nonneg=True), _real("s_noise", s_noise)


# -- shared plumbing --------------------------------------------------------------------------
class _Run:
    """Per-call state: the checked inputs, the Philox seed, and one fused update.

    ``sigmas=None`` for the samplers that take sigma_min and sigma_max instead of a schedule.
    """

    def __init__(self, model, x, sigmas, extra_args, noise_sampler):
        if not callable(model):
            raise TypeError("model: must be callable as model(x, sigma, **extra_args)")
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
            raise TypeError("x: expected a floating-point tensor [B, ...]")
        if noise_sampler is not None and not callable(noise_sampler):
            raise TypeError("noise_sampler: must be callable as noise_sampler(sigma, sigma_next)")
        if sigmas is not None:
            sigmas = torch.as_tensor(sigmas)
            if sigmas.dim() != 1 or sigmas.numel() < 2:
                raise ValueError(
                    f"sigmas: expected a 1-d schedule of at least 2 values, got shape {tuple(sigmas.shape)}"
                )
            s = sigmas.detach().double().cpu()
            if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
                raise ValueError("sigmas: must be finite and >= 0")
            if bool((s[:-1] == 0).any()):
                raise ValueError("sigmas: only the last sigma may be 0 (every step divides by its sigma)")
            self.s = s.tolist()  # host floats for the coefficients (k-diffusion reads them too)
        self.model, self.sigmas = model, sigmas
        self.extra = {} if extra_args is None else extra_args
        self.s_in = x.new_ones([x.shape[0]])
        self.noise_sampler = noise_sampler
        self.seed = philox_seed() if noise_sampler is None else 0
        self.fused = FusedUpdater()

    def at(self, sigma: float) -> Tensor:
        """A sigma computed on the host, as a 0-d tensor like the schedule's (the model's input)."""
        return torch.tensor(sigma, dtype=self.sigmas.dtype, device=self.sigmas.device)

    def draw(self, step: int, i: int) -> dict:
        """Noise keywords of ``update``: Philox draw ``step``, or noise_sampler(sigmas[i], sigmas[i + 1])."""
        return {"step": step, "sigma": self.sigmas[i], "sigma_next": self.sigmas[i + 1]}

    def denoise(self, x: Tensor, i_or_sigma) -> Tensor:
        sigma = self.sigmas[i_or_sigma] if isinstance(i_or_sigma, int) else i_or_sigma
        return self.model(x, sigma * self.s_in, **self.extra)

    def update(
        self, x: Tensor, terms, *, x_coef: float = 1.0, noise: float = 0.0, step: int = 0, sigma=None, sigma_next=None
    ) -> Tensor:
        """x_coef x + sum c t + noise z with z the Philox draw of step ``step`` or the noise sampler's."""
        terms = [(float(c), t) for c, t in terms]
        if noise and self.noise_sampler is not None:
            terms.append((float(noise), self.noise_sampler(sigma, sigma_next).to(x.dtype)))
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
        x = run.update(x, [], noise=s_noise * (hat**2 - sig**2) ** 0.5, **run.draw(i, i))
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
    eta, s_noise = _noise_args(eta, s_noise)
    run = _Run(model, x, sigmas, extra_args, noise_sampler)
    for i in trange(len(run.s) - 1, disable=disable):
        denoised = run.denoise(x, i)
        down, up = get_ancestral_step(run.s[i], run.s[i + 1], eta=eta)
        _callback(callback, x, i, run.sigmas[i], run.sigmas[i], denoised)
        noise = s_noise * up if run.s[i + 1] > 0 else 0.0
        x = _euler(run, x, denoised, run.s[i], down, noise=noise, **run.draw(i, i))
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


@torch.no_grad()
def sample_dpm_2_ancestral(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None
):
    """Ancestral sampling with DPM-Solver-2 steps (midpoint in log sigma down to sigma_down, then
    noise sigma_up); an Euler step where sigma_down = 0.  Philox noise unless a noise_sampler is given."""
    eta, s_noise = _noise_args(eta, s_noise)
    run = _Run(model, x, sigmas, extra_args, noise_sampler)
    for i in trange(len(run.s) - 1, disable=disable):
        denoised = run.denoise(x, i)
        sig = run.s[i]
        down, up = get_ancestral_step(sig, run.s[i + 1], eta=eta)
        _callback(callback, x, i, run.sigmas[i], run.sigmas[i], denoised)
        if down == 0:
            x = _euler(run, x, denoised, sig, down)  # k-diffusion adds no noise on this branch
        else:
            mid = math.exp(0.5 * (math.log(sig) + math.log(down)))
            x_2 = _euler(run, x, denoised, sig, mid)
            denoised_2 = run.denoise(x_2, run.at(mid))
            c = (down - sig) / mid  # x + d_2 (down - sig), d_2 = (x_2 - D_2) / mid
            x = run.update(x, [(c, x_2), (-c, denoised_2)], noise=s_noise * up, **run.draw(i, i))
    return x


def _lms_coeff(order: int, t: list[float], i: int, j: int) -> float:
    """int_{t_i}^{t_{i+1}} of the Lagrange basis polynomial j over t_i, ..., t_{i-order+1}, exactly."""
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-t[i - k], 1.0]) / (t[i - j] - t[i - k])
    integral = poly.integ()
    return float(integral(t[i + 1]) - integral(t[i]))


def linear_multistep_coeff(order: int, t, i: int, j: int) -> float:
    """k-diffusion's LMS coefficient: the integral over [t_i, t_{i+1}] of Lagrange basis polynomial j
    on t_i, ..., t_{i-order+1} (exact here; k-diffusion uses ``scipy.integrate.quad``)."""
    if order - 1 > i:
        raise ValueError(f"order: {order} is too high for step {i}")
    return _lms_coeff(order, [float(v) for v in t], i, j)


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


def _sigma_range(sigma_min, sigma_max) -> tuple[float, float]:
    lo, hi = _real("sigma_min", sigma_min, positive=True), _real("sigma_max", sigma_max, positive=True)
    if lo == hi:
        raise ValueError(f"sigma_min: must differ from sigma_max (both {lo})")
    return lo, hi


def _forward_only(eta: float, lo: float, hi: float) -> None:
    if eta and lo > hi:
        raise ValueError("eta: must be 0 for reverse sampling (sigma_min > sigma_max)")


@torch.no_grad()
def sample_dpm_fast(
    model,
    x,
    sigma_min,
    sigma_max,
    n,
    extra_args=None,
    callback=None,
    disable=None,
    eta=0.0,
    s_noise=1.0,
    noise_sampler=None,
):
    """DPM-Solver-fast (Lu et al. 2022, fixed steps): n model evaluations on a grid uniform in
    t = -log sigma from sigma_max to sigma_min, orders 3, ..., 3, then 2 and 1 (n % 3 == 0) or n % 3,
    as k-diffusion's ``DPMSolver.dpm_solver_fast``.  ``eta > 0`` adds ancestral noise after each
    step (Philox, k = step, unless a noise_sampler is given); sigma_min > sigma_max integrates
    towards more noise (eta = 0 only).  The callback gets k-diffusion's keys: x, i, t, t_up,
    sigma, sigma_hat, denoised.  Each stage is one fused pass."""
    lo, hi = _sigma_range(sigma_min, sigma_max)
    if isinstance(n, bool):
        raise TypeError("n: expected an int")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n: expected an int, got {type(n).__name__}") from None
    if n < 1:
        raise ValueError(f"n: must be >= 1 model evaluations, got {n}")
    eta, s_noise = _noise_args(eta, s_noise)
    _forward_only(eta, lo, hi)
    run = _Run(model, x, None, extra_args, noise_sampler)
    with tqdm(total=n, disable=disable) as pbar:
        return _kd_dpm_solver.fast(run, x, lo, hi, n, eta=eta, s_noise=s_noise, callback=callback, pbar=pbar)


@torch.no_grad()
def sample_dpm_adaptive(
    model,
    x,
    sigma_min,
    sigma_max,
    extra_args=None,
    callback=None,
    disable=None,
    order=3,
    rtol=0.05,
    atol=0.0078,
    h_init=0.05,
    pcoeff=0.0,
    icoeff=1.0,
    dcoeff=0.0,
    accept_safety=0.81,
    eta=0.0,
    s_noise=1.0,
    noise_sampler=None,
    return_info=False,
):
    """DPM-Solver-12 (order 2) or -23 (order 3) with adaptive steps in t = -log sigma, as
    k-diffusion's ``DPMSolver.dpm_solver_adaptive``: the embedded lower-order solution gives the
    error, k-diffusion's PID controller (pcoeff, icoeff, dcoeff, accept_safety; order 1.5 when
    eta > 0) proposes the next step, h_init is the first step in t.

    Difference from k-diffusion, on purpose: the error is controlled per sample.  Each sample
    has its own t, step size, PID history and accept/reject, with its own error norm
    ||(x_low - x_high) / max(atol, rtol max(|x_low|, |x_prev|))|| / sqrt(D) (D elements per sample,
    summed by ``sf.ops.sample_norm`` in a fixed order); k-diffusion takes one norm over the whole
    batch and steps every sample together.  So a sample's result and step count do not depend on
    the batch it is in, and equal k-diffusion's for that sample alone (B = 1).  A sample that reaches
    sigma_min leaves the batch: later model calls see only the samples still running, with their
    rows of the ``extra_args`` tensors that have B rows (others are passed as they are).  A
    non-finite error estimate ends the run with ``scorefast.NonFiniteError`` (k-diffusion would
    loop on NaN).

    Noise (eta > 0): Philox, k = attempt number, added where a sample accepts; a noise_sampler is
    called once per distinct (sigma, sigma_next) pair among the accepting samples and row b taken.
    ``return_info=True`` returns (x, info): k-diffusion's keys steps, nfe, n_accept, n_reject as
    ints, the batch's worst sample (k-diffusion's counts for B = 1), and the same per sample as
    [B] int64 tensors under ``steps_per_sample``, ``nfe_per_sample``, ... .  The callback gets
    k-diffusion's keys after each attempt (x, i, t, t_up, sigma, sigma_hat, denoised, error, h and
    the counts), with x, t, sigma, error and h for the whole batch (a finished sample's last values).
    """
    lo, hi = _sigma_range(sigma_min, sigma_max)
    if order not in (2, 3):
        raise ValueError(f"order: must be 2 or 3, got {order!r}")
    rtol = _real("rtol", rtol, nonneg=True)
    atol = _real("atol", atol, positive=True)
    h_init = _real("h_init", h_init)
    if h_init == 0:
        raise ValueError("h_init: must be nonzero")
    pid = {k: _real(k, v) for k, v in (("pcoeff", pcoeff), ("icoeff", icoeff), ("dcoeff", dcoeff))}
    accept_safety = _real("accept_safety", accept_safety)
    eta, s_noise = _noise_args(eta, s_noise)
    _forward_only(eta, lo, hi)
    run = _Run(model, x, None, extra_args, noise_sampler)
    with tqdm(disable=disable) as pbar:
        x, info = _kd_dpm_solver.adaptive(
            run,
            x,
            lo,
            hi,
            order=order,
            rtol=rtol,
            atol=atol,
            h_init=h_init,
            accept_safety=accept_safety,
            eta=eta,
            s_noise=s_noise,
            callback=callback,
            pbar=pbar,
            **pid,
        )
    return (x, info) if return_info else x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None
):
    """Ancestral sampling with DPM-Solver++(2S) steps (the midpoint in log sigma down to sigma_down,
    then noise sigma_up); an Euler step where sigma_down = 0.  Philox noise unless a noise_sampler is given."""
    eta, s_noise = _noise_args(eta, s_noise)
    run = _Run(model, x, sigmas, extra_args, noise_sampler)
    for i in trange(len(run.s) - 1, disable=disable):
        denoised = run.denoise(x, i)
        sig, nxt = run.s[i], run.s[i + 1]
        down, up = get_ancestral_step(sig, nxt, eta=eta)
        _callback(callback, x, i, run.sigmas[i], run.sigmas[i], denoised)
        noise = {"noise": s_noise * up if nxt > 0 else 0.0, **run.draw(i, i)}
        if down == 0:
            x = _euler(run, x, denoised, sig, down, **noise)
        else:
            h = math.log(sig) - math.log(down)  # t_next - t with t = -log sigma
            mid = math.exp(0.5 * (math.log(sig) + math.log(down)))
            x_2 = run.update(x, [(-math.expm1(-h / 2), denoised)], x_coef=mid / sig)
            denoised_2 = run.denoise(x_2, run.at(mid))
            x = run.update(x, [(-math.expm1(-h), denoised_2)], x_coef=down / sig, **noise)
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None, r=1 / 2
):
    """DPM-Solver++ (stochastic, 2 stages): an ancestral step to the intermediate sigma at fraction r
    of the step in log sigma, then one from sigma_i to sigma_{i+1} with the two denoised values mixed
    (1 - 1/(2r), 1/(2r)); Euler into sigma = 0.  Two draws a step (k = 2i, 2i + 1): Philox unless a
    noise_sampler is given (k-diffusion defaults to a ``BrownianTreeNoiseSampler``: pass one for that)."""
    eta, s_noise = _noise_args(eta, s_noise)
    r = _real("r", r, positive=True)
    run = _Run(model, x, sigmas, extra_args, noise_sampler)
    fac = 1 / (2 * r)
    for i in trange(len(run.s) - 1, disable=disable):
        denoised = run.denoise(x, i)
        _callback(callback, x, i, run.sigmas[i], run.sigmas[i], denoised)
        sig, nxt = run.s[i], run.s[i + 1]
        if nxt == 0:
            x = _euler(run, x, denoised, sig, nxt)
            continue
        # k-diffusion's sigmas of this step, as its tensors (the model's and the noise sampler's input)
        t, t_next = run.sigmas[i].log().neg(), run.sigmas[i + 1].log().neg()
        sig_t, sig_s, sig_n = t.neg().exp(), (t + (t_next - t) * r).neg().exp(), t_next.neg().exp()
        mid = math.exp(-(-math.log(sig) + (math.log(sig) - math.log(nxt)) * r))
        down, up = get_ancestral_step(sig, mid, eta)
        keep = down / sig  # sigma_fn(s_) / sigma_fn(t); -expm1(t - s_) = 1 - keep
        draw = {"sigma": sig_t, "sigma_next": sig_s, "step": 2 * i}
        x_2 = run.update(x, [(1 - keep, denoised)], x_coef=keep, noise=s_noise * up, **draw)
        denoised_2 = run.denoise(x_2, sig_s)
        down, up = get_ancestral_step(sig, nxt, eta)
        keep = down / sig
        draw = {"sigma": sig_t, "sigma_next": sig_n, "step": 2 * i + 1}
        terms = [((1 - keep) * (1 - fac), denoised), ((1 - keep) * fac, denoised_2)]
        x = run.update(x, terms, x_coef=keep, noise=s_noise * up, **draw)
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
    eta, s_noise = _noise_args(eta, s_noise)
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
                **run.draw(i, i),
            )
        old, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None
):
    """DPM-Solver++(3M) SDE (per-step Philox noise unless a noise_sampler is given)."""
    eta, s_noise = _noise_args(eta, s_noise)
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
                **run.draw(i, i),
            )
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
    return x
