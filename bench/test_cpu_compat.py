"""CPU: the drop-in compat layers against the real packages they replace, same run.

k-diffusion's samplers (loaded from the installed package as the parity tests do) and diffusers'
schedulers, each against ``scorefast.compat``'s version on the same denoiser / model output at a
fixed step count (``sample_dpm_adaptive``: at the same rtol/atol).  Both draw their noise as they
normally would, except that k-diffusion's SDE samplers get per-step Gaussian noise instead of a
Brownian tree.  Skipped where the peer package is not installed.
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


KD_SAMPLERS = {  # sampler -> NFE at STEPS sigmas (two-stage samplers: 2 a step but the last, into sigma = 0)
    "sample_euler_ancestral": STEPS,
    "sample_heun": 2 * STEPS - 1,
    "sample_dpmpp_2m": STEPS,
    "sample_dpmpp_2m_sde": STEPS,
    "sample_dpm_2_ancestral": 2 * STEPS - 1,
    "sample_dpmpp_2s_ancestral": 2 * STEPS - 1,
    "sample_dpmpp_sde": 2 * STEPS - 1,
}


@pytest.mark.parametrize("role", ["eager", "fused"])
@pytest.mark.parametrize("sampler", list(KD_SAMPLERS))
def test_k_diffusion(record, sampler, role):
    """Samplers on a Karras schedule.  Both sides draw per-step Gaussian noise: k-diffusion's SDE
    samplers are given randn_like instead of their default Brownian tree (ours draw Philox)."""
    model = _Denoiser()
    sigmas = ours_kd.get_sigmas_karras(STEPS, 0.002, 80.0)
    x0 = torch.randn(B, D, generator=torch.Generator().manual_seed(1)) * 80
    mod = _kd() if role == "eager" else ours_kd
    kw = {}
    if sampler.endswith("_sde") and role == "eager":
        kw["noise_sampler"] = lambda s, sn: torch.randn_like(x0)
    fn = getattr(mod, sampler)
    _record_kd(record, role, sampler, lambda: fn(model, x0, sigmas, disable=True, **kw), KD_SAMPLERS[sampler])


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
    """Same rtol/atol; NFE is each side's own count: ours the slowest sample's (every sample controls
    its own error; finished samples leave the batch), k-diffusion's one norm over the batch."""
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


# -- diffusers: every scheduler of scorefast.compat.diffusers against diffusers' own -------------------
DIFFUSERS_SCHEDULERS = [  # (class name, config, label suffix)
    ("DDIMScheduler", {}, ""),
    ("DDPMScheduler", {}, ""),
    ("PNDMScheduler", {"skip_prk_steps": True}, ""),
    ("LMSDiscreteScheduler", {}, ""),
    ("EulerDiscreteScheduler", {}, ""),
    ("EulerAncestralDiscreteScheduler", {}, ""),
    ("HeunDiscreteScheduler", {}, ""),
    ("DPMSolverMultistepScheduler", {}, ""),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "[sde-dpmsolver++]"),
    ("DPMSolverSinglestepScheduler", {}, ""),
    ("KDPM2DiscreteScheduler", {}, ""),
    ("KDPM2AncestralDiscreteScheduler", {}, ""),
    ("DEISMultistepScheduler", {}, ""),
    ("UniPCMultistepScheduler", {}, ""),
    ("DPMSolverSDEScheduler", {"noise_sampler_seed": 0}, ""),
    ("EDMEulerScheduler", {}, ""),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, ""),
    ("FlowMatchHeunDiscreteScheduler", {}, ""),
    ("LCMScheduler", {}, ""),
    ("ScoreSdeVeScheduler", {}, ""),
]


# DPMSolverSDE's Brownian-tree noise (torchsde, diffusers' own in both roles) costs ~100x its arithmetic
_FEW_STEPS = {"DPMSolverSDEScheduler": 10, "LCMScheduler": 4}


def _diffusers_loop(sched, x0, out):
    """The pipelines' loop with a fixed model output: set_timesteps, then one step per timestep."""
    if hasattr(sched, "set_sigmas"):  # score_sde's VE: corrector then predictor, as its pipeline
        sched.set_timesteps(STEPS)
        sched.set_sigmas(STEPS)
        x = x0 * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.step_correct(out, x).prev_sample
            x = sched.step_pred(out, t, x).prev_sample
        return x
    sched.set_timesteps(_FEW_STEPS.get(sched.__class__.__name__, STEPS))
    x = x0 * getattr(sched, "init_noise_sigma", 1.0)
    for t in sched.timesteps:
        x = sched.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("role", ["eager", "fused"])
@pytest.mark.parametrize(
    "scheduler,config,label", DIFFUSERS_SCHEDULERS, ids=[n + s for n, _, s in DIFFUSERS_SCHEDULERS]
)
def test_diffusers(record, scheduler, config, label, role):
    diffusers = pytest.importorskip("diffusers")
    from scorefast.compat import diffusers as ours_df

    cls = getattr(diffusers if role == "eager" else ours_df, scheduler)
    sched = cls(**config)
    x0 = torch.randn(B, D, generator=torch.Generator().manual_seed(1))
    out = 0.1 * torch.randn(B, D, generator=torch.Generator().manual_seed(2))
    _diffusers_loop(sched, x0, out)  # builds the timestep tables once, outside the timing
    nfe = len(sched.timesteps) * (2 if hasattr(sched, "set_sigmas") else 1)
    record(
        lambda: _diffusers_loop(sched, x0, out),
        name=f"{'diffusers' if role == 'eager' else 'sf.compat.diffusers'}.{scheduler}{label}.step",
        backend="torch" if role == "eager" else "cpu",
        dtype=torch.float32,
        size=B,
        group=f"diffusers-{scheduler}{label}",
        role=role,
        rounds=3 if scheduler == "DPMSolverSDEScheduler" else 15,
        nfe=nfe,
        peer="diffusers",
        model="fixed model output",
    )
