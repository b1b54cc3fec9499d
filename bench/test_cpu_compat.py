"""CPU: the drop-in compat layers against the real packages they replace, same run.

k-diffusion's samplers (loaded from the installed package as the parity tests do) and diffusers'
schedulers, each against ``scorefast.compat``'s version on the same denoiser / model output at a
fixed step count; both draw their noise as they normally would.  Skipped where the peer package
is not installed.
"""

from __future__ import annotations

import pytest
import torch

from bench.conftest import QUICK
from scorefast.compat import k_diffusion as ours_kd

B = 64 if QUICK else 256
D = 1024  # image-like rows (a 32x32 channel): per-sample work, not per-launch overhead, dominates
STEPS = 20 if QUICK else 50


class _Denoiser(torch.nn.Module):
    """A small MLP denoiser D(x, sigma) = x - sigma * net(x / sqrt(1 + sigma^2), log sigma)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(D + 1, 64), torch.nn.SiLU(), torch.nn.Linear(64, D))

    def forward(self, x, sigma):
        c_in = (1 + sigma**2).rsqrt()[:, None]
        return x - sigma[:, None] * self.net(torch.cat([x * c_in, sigma.log()[:, None]], 1))


def _kd():
    from tests.peers import k_diffusion_sampling

    return k_diffusion_sampling()


@pytest.mark.parametrize("role", ["eager", "fused"])
@pytest.mark.parametrize("sampler", ["sample_euler_ancestral", "sample_heun", "sample_dpmpp_2m", "sample_dpmpp_2m_sde"])
def test_k_diffusion(record, sampler, role):
    kd = _kd()
    model = _Denoiser()
    sigmas = ours_kd.get_sigmas_karras(STEPS, 0.002, 80.0)
    x0 = torch.randn(B, D, generator=torch.Generator().manual_seed(1)) * 80
    mod = kd if role == "eager" else ours_kd
    kw = {}
    if sampler == "sample_dpmpp_2m_sde" and role == "eager":  # same per-step Gaussian noise, not a Brownian tree
        kw["noise_sampler"] = lambda s, sn: torch.randn_like(x0)
    fn = getattr(mod, sampler)
    nfe = 2 * STEPS - 1 if sampler == "sample_heun" else STEPS
    with torch.no_grad():
        record(
            lambda: fn(model, x0, sigmas, disable=True, **kw),
            name=f"{'k-diffusion' if role == 'eager' else 'sf.compat.k_diffusion'}.{sampler}",
            backend="torch" if role == "eager" else "cpu",
            dtype=torch.float32,
            size=B,
            group=f"kd-{sampler}",
            role=role,
            rounds=15,
            nfe=nfe,
            peer="k-diffusion",
            model="mlp-denoiser",
        )


# -- k-diffusion: the samplers added for full coverage (issue 20) -------------------------------
KD_MORE = {  # sampler -> NFE at STEPS sigmas (2 a step but the last, Euler into sigma = 0)
    "sample_dpm_2_ancestral": 2 * STEPS - 1,
    "sample_dpmpp_2s_ancestral": 2 * STEPS - 1,
    "sample_dpmpp_sde": 2 * STEPS - 1,
}


def _record_kd(record, role, sampler, run, nfe, **extra):
    with torch.no_grad():
        return record(
            run,
            name=f"{'k-diffusion' if role == 'eager' else 'sf.compat.k_diffusion'}.{sampler}",
            backend="torch" if role == "eager" else "cpu",
            dtype=torch.float32,
            size=B,
            group=f"kd-{sampler}",
            role=role,
            rounds=15,
            nfe=nfe,
            peer="k-diffusion",
            model="mlp-denoiser",
            **extra,
        )


@pytest.mark.parametrize("role", ["eager", "fused"])
@pytest.mark.parametrize("sampler", list(KD_MORE))
def test_k_diffusion_more(record, sampler, role):
    """Ancestral and SDE samplers: both sides draw per-step Gaussian noise (k-diffusion's
    ``sample_dpmpp_sde`` is given randn_like instead of its default Brownian tree, as ours is Philox)."""
    mod = _kd() if role == "eager" else ours_kd
    model = _Denoiser()
    sigmas = ours_kd.get_sigmas_karras(STEPS, 0.002, 80.0)
    x0 = torch.randn(B, D, generator=torch.Generator().manual_seed(1)) * 80
    kw = {"noise_sampler": lambda s, sn: torch.randn_like(x0)} if role == "eager" else {}
    fn = getattr(mod, sampler)
    _record_kd(record, role, sampler, lambda: fn(model, x0, sigmas, disable=True, **kw), KD_MORE[sampler])


@pytest.mark.parametrize("role", ["eager", "fused"])
def test_k_diffusion_dpm_fast(record, role):
    mod = _kd() if role == "eager" else ours_kd
    model = _Denoiser()
    x0 = torch.randn(B, D, generator=torch.Generator().manual_seed(1)) * 80
    _record_kd(
        record, role, "sample_dpm_fast", lambda: mod.sample_dpm_fast(model, x0, 0.002, 80.0, STEPS, disable=True), STEPS
    )


@pytest.mark.parametrize("role", ["eager", "fused"])
def test_k_diffusion_dpm_adaptive(record, role):
    """Same rtol/atol; NFE is each side's own count (ours: the batch's slowest sample, since every
    sample controls its own error; k-diffusion: one norm over the batch)."""
    mod = _kd() if role == "eager" else ours_kd
    model = _Denoiser()
    x0 = torch.randn(B, D, generator=torch.Generator().manual_seed(1)) * 80
    kw = {"rtol": 0.05, "atol": 0.0078, "disable": True, "return_info": True}
    with torch.no_grad():
        _, info = mod.sample_dpm_adaptive(model, x0, 0.002, 80.0, **kw)
    _record_kd(
        record,
        role,
        "sample_dpm_adaptive",
        lambda: mod.sample_dpm_adaptive(model, x0, 0.002, 80.0, **kw),
        info["nfe"],
        rtol=0.05,
    )


@pytest.mark.parametrize("role", ["eager", "fused"])
@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_diffusers(record, scheduler, role):
    diffusers = pytest.importorskip("diffusers")
    from scorefast.compat import diffusers as ours_df

    cls = getattr(diffusers if role == "eager" else ours_df, scheduler)
    sched = cls()
    x0 = torch.randn(B, D, generator=torch.Generator().manual_seed(1))
    out = 0.1 * torch.randn(B, D, generator=torch.Generator().manual_seed(2))

    def run():
        sched.set_timesteps(STEPS)
        x = x0 * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.step(out, t, x).prev_sample
        return x

    record(
        run,
        name=f"{'diffusers' if role == 'eager' else 'sf.compat.diffusers'}.{scheduler}.step",
        backend="torch" if role == "eager" else "cpu",
        dtype=torch.float32,
        size=B,
        group=f"diffusers-{scheduler}",
        role=role,
        rounds=15,
        nfe=STEPS,
        peer="diffusers",
        model="fixed model output",
    )
