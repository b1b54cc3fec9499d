"""The peers' loops of the quality suite, driven by the same score function and SDE as ours.

- k-diffusion (the real package, loaded as the parity tests load it): samplers in sigma-space,
  x_sigma = x_t / a(t), sigma = s(t) / a(t), on the sigma grid of our default grid for the SDE,
  from the same prior draw; the denoiser D(x_sigma, sigma) = (x_t + s^2 score(x_t, t)) / a at the
  time t(sigma) of the SDE.  Stochastic ones draw ``torch.randn_like`` noise (k-diffusion's
  default noise sampler) after ``torch.manual_seed``.
- diffusers (VP-type SDEs): DDIM, DPM-Solver++ (2M), UniPC and Euler schedulers with their default
  config and timesteps, through ``scale_model_input`` / ``step``; the model output is the exact
  epsilon at the scheduler's own alphas_cumprod: -s score at the SDE time of its sigma.
- score_sde (VP, VE): the PC sampler (reverse diffusion + Langevin corrector, snr 0.16), the reverse
  diffusion, Euler-Maruyama and ancestral predictors and the probability-flow Euler predictor, on
  their own grid (N = NFE steps; VP needs N > 20, its tables have beta_max / N < 1).

Every runner counts the score/model calls it makes: the NFE a row reports is counted, not assumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.baselines import _col
from scorefast.sampling import _grid


@dataclass(frozen=True)
class Peer:
    """A peer's loop: ``run(score_fn, sde, shape, nfe, seed) -> (samples, nfe) | None`` (None: the
    budget does not fit the loop)."""

    label: str
    package: str
    sdes: tuple[str, ...]  # the suite's SDE keys it runs on
    run: Callable


class _Counted:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kw):
        self.calls += 1
        return self.fn(*args, **kw)


def sigma_to_t(sde, sigma: torch.Tensor) -> torch.Tensor:
    """The SDE time [B] (float64) whose s(t) / a(t) is sigma: closed forms for VP, VE, EDM and
    RectifiedFlow, else interpolation of log sigma on a fine grid (built once per SDE)."""
    sig = sigma.to(torch.float64)
    kind = type(sde).__name__
    if kind == "VPSDE":  # log(1 + sigma^2) = beta_0 t + (beta_1 - beta_0) t^2 / 2
        d, b0 = sde.beta_1 - sde.beta_0, sde.beta_0
        return (-b0 + torch.sqrt(b0 * b0 + 2 * d * torch.log1p(sig * sig))) / d
    if kind == "VESDE":
        return torch.log(sig / sde.sigma_min) / math.log(sde.sigma_max / sde.sigma_min)
    if kind == "EDM":
        return sig
    if kind == "RectifiedFlow":  # sigma = t / (1 - t)
        return sig / (1 + sig)
    fine, log_sig = _fine_grid(sde)
    ls = torch.log(sig.cpu())
    idx = torch.searchsorted(log_sig, ls).clamp(1, fine.numel() - 1)
    w = (ls - log_sig[idx - 1]) / (log_sig[idx] - log_sig[idx - 1])
    return (fine[idx - 1] + w * (fine[idx] - fine[idx - 1])).to(sigma.device)


_FINE: dict = {}


def _fine_grid(sde) -> tuple[torch.Tensor, torch.Tensor]:
    key = (type(sde).__name__, repr(sde))
    if key not in _FINE:
        fine = torch.linspace(sde.eps, sde.T, 400_001, dtype=torch.float64)
        _FINE[key] = fine, torch.log(sde.std(fine) / sde.mean_coef(fine))
    return _FINE[key]


def _sigma_denoiser(score_fn, sde):
    """k-diffusion's D(x_sigma, sigma [B]) from score_fn(x_t, t) of ``sde``."""

    def model(x, sigma):
        t = sigma_to_t(sde, sigma)
        a, s = _col(sde.mean_coef(t).to(x.dtype), x), _col(sde.std(t).to(x.dtype), x)
        x_t = a * x
        return (x_t + s**2 * score_fn(x_t, t.to(x.dtype))) / a

    return model


# -- k-diffusion ------------------------------------------------------------------------------
KD_SAMPLERS = {  # name -> NFE per sigma interval
    "euler": 1,
    "heun": 2,
    "lms": 1,
    "dpmpp_2m": 1,
    "euler_ancestral": 1,
    "dpmpp_2m_sde": 1,
    "dpmpp_3m_sde": 1,
}


def _kd_run(name: str, per_step: int):
    def run(score_fn, sde, shape, nfe, seed):
        from tests.peers import k_diffusion_sampling

        kd = k_diffusion_sampling()
        N = nfe if per_step == 1 else (nfe + 1) // 2  # heun: 2 per interval, 1 into sigma = 0
        times = _grid(sde, N, None, None, "cpu")[0]
        a_T = float(sde.mean_coef(times[:1]))
        sig = sde.std(times) / sde.mean_coef(times)
        sigmas = torch.cat([sig, sig.new_zeros(1)]).float()
        x = sde.prior_sampling(shape, seed=seed) / a_T
        model = _Counted(_sigma_denoiser(score_fn, sde))
        kw = {"disable": True}
        if "sde" in name or "ancestral" in name:
            kw["noise_sampler"] = lambda s, s_next: torch.randn_like(x)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = getattr(kd, f"sample_{name}")(model, x, sigmas, **kw)
        return out, model.calls

    return run


# -- diffusers --------------------------------------------------------------------------------
DIFFUSERS = {  # default configs, but DDIM's clip_sample (x0 clipped to [-1, 1], for images)
    "DDIMScheduler": {"clip_sample": False},
    "DPMSolverMultistepScheduler": {},
    "UniPCMultistepScheduler": {},
    "EulerDiscreteScheduler": {},
}


def _diffusers_run(cls_name: str, config: dict):
    def run(score_fn, sde, shape, nfe, seed):
        import diffusers

        sched = getattr(diffusers, cls_name)(**config)
        sched.set_timesteps(nfe)
        abar = sched.alphas_cumprod.to(torch.float64)
        x = sde.prior_sampling(shape, seed=seed) * float(sched.init_noise_sigma)
        model = _Counted(score_fn)
        torch.manual_seed(seed)
        with torch.no_grad():
            for tau in sched.timesteps:
                x_in = sched.scale_model_input(x, tau)  # VP-scaled: x_t of the SDE
                i = float(tau)
                lo = min(int(i), len(abar) - 2)
                ab = abar[lo] + (i - lo) * (abar[lo + 1] - abar[lo])  # Euler's timesteps are fractional
                sigma = torch.sqrt((1 - ab) / ab).reshape(1).expand(shape[0])
                t = sigma_to_t(sde, sigma)
                eps = -_col(sde.std(t).to(x.dtype), x) * model(x_in, t.to(x.dtype))
                x = sched.step(eps, tau, x).prev_sample
        return x, model.calls

    return run


# -- score_sde --------------------------------------------------------------------------------
def _score_sde_run(kind: str):
    def run(score_fn, sde, shape, nfe, seed):
        from bench.baselines import score_sde

        N = nfe // 2 if kind == "pc" else nfe
        try:
            sde_n = type(sde)(**{**sde.config(), "N": N})
        except ValueError:  # VP tables need beta_max / N < 1
            return None
        model = _Counted(score_fn)
        torch.manual_seed(seed)
        if kind == "pc":
            x = score_sde.pc_sampler(model, sde_n, shape)
        elif kind in ("reverse_diffusion", "euler_maruyama"):
            x = score_sde.pc_sampler(model, sde_n, shape, n_steps=0, predictor=kind)
        elif kind == "ancestral":
            x = score_sde.predictor_sampler(model, sde_n, shape, "ancestral")
        else:
            x = score_sde.predictor_sampler(model, sde_n, shape, "ode", probability_flow=True)
        return x, model.calls

    return run


def peers(sde_keys: tuple[str, ...] = ("vp", "ve", "edm", "rf")) -> list[Peer]:
    """Every peer loop of the suite."""
    out = [Peer(f"k-diffusion {n}", "k-diffusion", sde_keys, _kd_run(n, k)) for n, k in KD_SAMPLERS.items()]
    out += [Peer(f"diffusers {c}", "diffusers", ("vp",), _diffusers_run(c, cfg)) for c, cfg in DIFFUSERS.items()]
    out += [
        Peer("score_sde pc (RD + Langevin)", "score_sde", ("vp", "ve"), _score_sde_run("pc")),
        Peer("score_sde reverse_diffusion", "score_sde", ("vp", "ve"), _score_sde_run("reverse_diffusion")),
        Peer("score_sde euler_maruyama", "score_sde", ("vp", "ve"), _score_sde_run("euler_maruyama")),
        Peer("score_sde ancestral", "score_sde", ("vp",), _score_sde_run("ancestral")),
        Peer("score_sde probability flow (Euler)", "score_sde", ("vp", "ve"), _score_sde_run("ode")),
    ]
    return out
