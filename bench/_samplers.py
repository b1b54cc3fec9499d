"""End-to-end sampler cases: scorefast vs eager copies of score_sde / k-diffusion at a fixed NFE budget."""

from __future__ import annotations

import math

import torch

import scorefast as sf
from bench.baselines import k_diffusion, others, score_sde


class MLPScore(torch.nn.Module):
    """A small time-conditioned MLP score network (2-D data, random weights: for timing).

    Scaled like the score of unit-variance data under the SDE: (0.1 net(x / sqrt(v), t) - x) / v with
    v = a(t)^2 + s(t)^2, so every SDE's time range stays finite.
    """

    def __init__(self, sde, dim: int = 2, width: int = 128):
        super().__init__()
        self.sde = sde
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + 1, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, dim),
        )

    def forward(self, x, t):
        t64 = t.double()
        v = (self.sde.mean_coef(t64) ** 2 + self.sde.std(t64) ** 2).to(x.dtype)[:, None]
        h = self.net(torch.cat([x / v.sqrt(), t.to(x.dtype)[:, None]], dim=1))
        return (0.1 * h - x) / v


def ve_time(ve, sigma: torch.Tensor) -> torch.Tensor:
    """VE time of noise level sigma (NCSN passes sigma; the score functions here take the SDE's t)."""
    return (torch.log(sigma / ve.sigma_min) / math.log(ve.sigma_max / ve.sigma_min)).to(sigma.dtype)


def _bind(score, sde, B, sampler, steps, options):
    return lambda: sf.sample(score, sde, (B, 2), sampler=sampler, steps=steps, **options)


def models():
    gm = sf.testing.GaussianMixture.builtin()

    def mlp(sde):
        torch.manual_seed(0)
        return torch.no_grad()(MLPScore(sde).eval())

    return {"gmm2d": (gm, lambda sde: gm.score_fn(sde)), "mlp": (gm, mlp)}


def cases(model: str, B: int, budget: int):
    """{role: (name, fn -> samples, nfe, peer)} for each sampler at ``budget`` NFE."""
    target, make_score = models()[model]
    out = {}
    vp = sf.sde.VPSDE(N=budget // 2)
    score_vp = make_score(vp)
    out["pc"] = {
        "eager": ("score_sde pc_sampler", lambda: score_sde.pc_sampler(score_vp, vp, (B, 2)), budget, "score_sde"),
        "fused": (
            "sf.sample(pc)",
            lambda: sf.sample(score_vp, vp, (B, 2), sampler="pc", steps=budget // 2, norm="batch"),
            budget,
            "score_sde",
        ),
    }
    vp_em = sf.sde.VPSDE(N=budget)
    score_em = make_score(vp_em)
    out["euler_maruyama"] = {
        "eager": (
            "score_sde EM predictor",
            lambda: score_sde.pc_sampler(score_em, vp_em, (B, 2), n_steps=0, predictor="euler_maruyama"),
            budget,
            "score_sde",
        ),
        "fused": (
            "sf.sample(euler_maruyama)",
            lambda: sf.sample(score_em, vp_em, (B, 2), sampler="euler_maruyama", steps=budget),
            budget,
            "score_sde",
        ),
    }
    out["reverse_diffusion"] = {
        "eager": (
            "score_sde RD predictor",
            lambda: score_sde.pc_sampler(score_em, vp_em, (B, 2), n_steps=0),
            budget,
            "score_sde",
        ),
        "fused": (
            "sf.sample(reverse_diffusion)",
            lambda: sf.sample(score_em, vp_em, (B, 2), sampler="reverse_diffusion", steps=budget),
            budget,
            "score_sde",
        ),
    }
    out["ancestral"] = {
        "eager": (
            "score_sde ancestral predictor",
            lambda: score_sde.predictor_sampler(score_em, vp_em, (B, 2), "ancestral"),
            budget,
            "score_sde",
        ),
        "fused": ("sf.sample(ancestral)", _bind(score_em, vp_em, B, "ancestral", budget, {}), budget, "score_sde"),
    }
    # score_sde's probability-flow EulerMaruyamaPredictor steps N times from T; ode_euler integrates
    # the N - 1 intervals and adds the Tweedie step: the same N NFE
    out["ode_euler"] = {
        "eager": (
            "score_sde EM predictor, probability_flow",
            lambda: score_sde.predictor_sampler(score_em, vp_em, (B, 2), "ode", probability_flow=True),
            budget,
            "score_sde",
        ),
        "fused": ("sf.sample(ode_euler)", _bind(score_em, vp_em, B, "ode_euler", budget, {}), budget, "score_sde"),
    }
    vp_free = sf.sde.VPSDE()
    score_free = make_score(vp_free)
    ddim_times = torch.linspace(vp_free.T, vp_free.eps, budget, dtype=torch.float64)
    x_free = vp_free.prior_sampling((B, 2), seed=0)
    out["ddim"] = {
        "eager": (
            "diffusers DDIM step loop",
            lambda: others.ddim(score_free, vp_free, x_free, ddim_times),
            budget,
            "diffusers",
        ),
        "fused": ("sf.sample(ddim)", _bind(score_free, vp_free, B, "ddim", budget, {}), budget, "diffusers"),
    }
    _, ode_nfe = score_sde.ode_sampler(score_free, vp_free, (B, 2))
    _, info = sf.sample(score_free, vp_free, (B, 2), sampler="rk45", rtol=1e-3, atol=1e-3, return_info=True)
    out["rk45"] = {
        "eager": (
            "score_sde ode_sampler (scipy RK45, rtol=atol=1e-3)",
            lambda: score_sde.ode_sampler(score_free, vp_free, (B, 2))[0],
            ode_nfe,
            "score_sde",
        ),
        "fused": (
            "sf.sample(rk45, rtol=atol=1e-3)",
            _bind(score_free, vp_free, B, "rk45", None, {"rtol": 1e-3, "atol": 1e-3}),
            info["nfe"],
            "score_sde",
        ),
    }
    ve = sf.sde.VESDE(0.01, 10)
    score_ve = make_score(ve)
    levels, each = 10, budget // 10
    sigmas = ve.std(ve.grid(levels)).tolist()
    x_ve = ve.prior_sampling((B, 2), seed=0)
    out["annealed_langevin"] = {
        "eager": (
            "NCSN anneal_Langevin_dynamics",
            lambda: others.anneal_langevin_dynamics(
                lambda y, sig: score_ve(y, ve_time(ve, sig)), x_ve, sigmas, each, 2e-5
            ),
            levels * each,
            "NCSN",
        ),
        "fused": (
            "sf.sample(annealed_langevin)",
            _bind(score_ve, ve, B, "annealed_langevin", levels, {"n_steps_each": each, "step_lr": 2e-5}),
            levels * each,
            "NCSN",
        ),
    }
    out["langevin"] = {
        "eager": (
            "eager Langevin loop",
            lambda: others.langevin_dynamics(score_ve, x_ve, ve.eps, budget, 5e-3),
            budget,
            "eager",
        ),
        "fused": (
            "sf.sample(langevin)",
            _bind(score_ve, ve, B, "langevin", budget, {"step_size": 5e-3}),
            budget,
            "eager",
        ),
    }
    edm = sf.sde.EDM()
    score_edm = make_score(edm)

    def denoiser(x, sigma):  # k-diffusion's D(x; sigma) from the score: x + sigma^2 s
        return x + sigma[:, None] ** 2 * score_edm(x, sigma)

    n_heun = (budget + 1) // 2
    sig_heun = torch.cat(
        [sf.sde.karras_sigmas(n_heun, edm.sigma_min, edm.sigma_max), torch.zeros(1, dtype=torch.float64)]
    )
    sig_dpm = torch.cat(
        [sf.sde.karras_sigmas(budget, edm.sigma_min, edm.sigma_max), torch.zeros(1, dtype=torch.float64)]
    )
    x_T = edm.prior_sampling((B, 2), seed=0)
    out["heun"] = {
        "eager": (
            "k-diffusion sample_heun",
            lambda: k_diffusion.sample_heun(denoiser, x_T, sig_heun.tolist()),
            2 * n_heun - 1,
            "k-diffusion",
        ),
        "fused": (
            "sf.sample(heun)",
            lambda: sf.sample(score_edm, edm, (B, 2), sampler="heun", steps=n_heun),
            2 * n_heun - 1,
            "k-diffusion",
        ),
    }
    out["dpm_solver++"] = {
        "eager": (
            "k-diffusion sample_dpmpp_2m",
            lambda: k_diffusion.sample_dpmpp_2m(denoiser, x_T, sig_dpm.tolist()),
            budget,
            "k-diffusion",
        ),
        "fused": (
            "sf.sample(dpm_solver++)",
            lambda: sf.sample(score_edm, edm, (B, 2), sampler="dpm_solver++", steps=budget),
            budget,
            "k-diffusion",
        ),
    }
    return target, out
