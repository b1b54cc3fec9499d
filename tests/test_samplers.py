"""Samplers against exact laws (no Monte-Carlo noise), mixtures, noise allocation and bad input.

Exact law: for Gaussian data N(m, c) in 1-D with its exact (linear) perturbed score, an affine
sampler's output is exactly A x_T + b + sum_k C_k z_k, where every z_k is a Philox draw we can
regenerate.  A float64 least-squares fit over B > K + 2 samples recovers (A, b, C) from the sampler
itself — the residual must vanish, proving the sampler is affine in exactly the counters
k = n*S + j it declares — and gives the chain's exact mean A m_T + b and variance
A^2 v_T + sum C_k^2.
"""

from __future__ import annotations

import math

import pytest
import torch

import scorefast as sf
from scorefast.rng import STREAM_PRIOR, STREAM_SAMPLER
from scorefast.sde import EDM, VESDE, VPSDE, DiscreteVP, SubVPSDE
from scorefast.testing import sliced_wasserstein
from tests.conftest import backend_params

M, C = 0.7, 0.25  # data mean and variance


def linear_score(sde):
    """Exact score of N(M, C) perturbed by sde, at t [B]: -(x - a M) / (a^2 C + s^2)."""

    def score(x, t, **_):
        t = t.double()
        a, s = sde.mean_coef(t), sde.std(t)
        return (-(x.double() - (a * M)[:, None]) / (a**2 * C + s**2)[:, None]).to(x.dtype)

    return score


def exact_law(sampler, sde, steps, options=None, backend="torch"):
    """(mean, var, residual, nfe) of the sampler's output via the regression described above."""
    options = options or {}
    module = sf.samplers.get(sampler)
    S = sf.samplers.draws_per_step(module, options)
    K = steps * S
    B = 2 * (K + 2) + 16
    x, info = sf.sample(
        linear_score(sde),
        sde,
        (B, 1),
        sampler=sampler,
        steps=steps,
        seed=5,
        backend=backend,
        return_info=True,
        dtype=torch.float64,
        **options,
    )
    ids = torch.arange(B)
    xT = sde.prior_sampling((B, 1), seed=5, sample_ids=ids, dtype=torch.float64, backend="torch")[:, 0]
    zs = [
        sf.randn((B, 1), seed=5, step=k, stream=STREAM_SAMPLER, sample_ids=ids, dtype=torch.float64, backend="torch")[
            :, 0
        ]
        for k in range(K)
    ]
    design = torch.stack([xT, torch.ones(B, dtype=torch.float64), *zs], dim=1)
    y = x[:, 0].double()
    coef = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    residual = (design @ coef - y).abs().max().item() / (y.abs().max().item() + 1e-30)
    A, b, Ck = coef[0], coef[1], coef[2:]
    var_T = sde.prior_std() ** 2
    return (b.item(), (A**2 * var_T + (Ck**2).sum()).item(), residual, info["nfe"])


AFFINE = [
    ("euler_maruyama", VPSDE(), {}),
    ("euler_maruyama", VESDE(0.01, 10), {}),
    ("euler_maruyama", SubVPSDE(), {}),
    ("reverse_diffusion", VPSDE(), {}),
    ("reverse_diffusion", VESDE(0.01, 10), {}),
    ("reverse_diffusion", SubVPSDE(), {}),
    ("ancestral", VPSDE(), {}),
    ("ancestral", VESDE(0.01, 10), {}),
    ("ddim", VPSDE(), {}),
    ("ddim", VPSDE(), {"eta": 1.0}),
    ("ddim", DiscreteVP.linear(), {}),
    ("ode_euler", VPSDE(), {}),
    ("ode_euler", VESDE(0.01, 10), {"steps": 400}),  # uniform-t Euler on VE is coarse at high sigma
    ("heun", EDM(), {}),
    ("heun", EDM(), {"s_churn": 5.0}),
    ("heun", VPSDE(), {}),
    ("dpm_solver++", VPSDE(), {}),
    ("dpm_solver++", EDM(), {}),
    ("dpm_solver++", EDM(), {"variant": "2m-sde"}),
    ("dpm_solver++", EDM(), {"variant": "3m", "eta": 0.5}),
]


def _id(case):
    name, sde, opts = case
    return f"{name}-{type(sde).__name__}-" + "-".join(f"{k}{v}" for k, v in opts.items())


@pytest.mark.parametrize("case", AFFINE, ids=[_id(c) for c in AFFINE])
def test_exact_law_is_affine_in_declared_draws_and_close_to_target(case):
    name, sde, options = case
    options = dict(options)
    steps = options.pop("steps", 40)
    mean, var, residual, _ = exact_law(name, sde, steps, options)
    assert residual < 1e-9, f"output is not affine in the declared draws (residual {residual:.2e})"
    # at 40 steps every sampler is within a first-order discretisation error of the target
    assert abs(mean - M) < 0.08 and abs(var - C) < 0.08, (mean, var)


ORDER_CASES = [
    ("euler_maruyama", VPSDE(), {}, 1),
    ("reverse_diffusion", VPSDE(), {}, 1),
    ("ode_euler", VPSDE(), {}, 1),
    ("heun", EDM(), {}, 2),
    ("heun", VPSDE(), {}, 2),
    ("dpm_solver++", VPSDE(), {}, 2),
    ("dpm_solver++", EDM(), {}, 2),
]


def continuous_limit(name, sde):
    """(mean, var) of the exact continuous-time sampler started from the same prior N(0, prior_std^2).

    ODE samplers: the probability-flow map T -> eps (a Gaussian transport, closed form) and then the
    Tweedie step.  SDE samplers: the reverse SDE's moment ODEs integrated T -> 0 with RK4 (float64).
    """
    v_p = sde.prior_std() ** 2

    def coefs(t):
        t = torch.tensor([t], dtype=torch.float64)
        a, s = sde.mean_coef(t).item(), sde.std(t).item()
        return a, a * a * C + s * s

    a_T, V_T = coefs(sde.T)
    if sf.samplers.get(name).KIND == "ode":
        a_e, V_e = coefs(sde.eps)
        gain = math.sqrt(V_e / V_T)  # x_eps - a_eps M = gain (x_T - a_T M)
        tweedie = a_e * C / V_e  # x0 = M + tweedie (x_eps - a_eps M)
        return M + tweedie * gain * (0.0 - a_T * M), (tweedie * gain) ** 2 * v_p

    def rhs(t, m, v):
        t = max(t, 0.0)
        tt = torch.tensor([t], dtype=torch.float64)
        f, g2 = sde.drift_coef(tt).item(), sde.diffusion(tt).item() ** 2
        a, V = coefs(t)
        return f * m + g2 * (m - a * M) / V, 2 * (f + g2 / V) * v - g2

    m, v, n = 0.0, v_p, 20_000
    h = -sde.T / n
    for i in range(n):
        t = sde.T + i * h
        k1 = rhs(t, m, v)
        k2 = rhs(t + h / 2, m + h / 2 * k1[0], v + h / 2 * k1[1])
        k3 = rhs(t + h / 2, m + h / 2 * k2[0], v + h / 2 * k2[1])
        k4 = rhs(t + h, m + h * k3[0], v + h * k3[1])
        m += h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        v += h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    return m, v


@pytest.mark.parametrize(
    "name,sde,options,order", ORDER_CASES, ids=[f"{c[0]}-{type(c[1]).__name__}-{c[3]}" for c in ORDER_CASES]
)
def test_convergence_order_without_monte_carlo_noise(name, sde, options, order):
    """|exact law - continuous limit| shrinks like steps^-order (no Monte-Carlo noise anywhere)."""
    m_lim, v_lim = continuous_limit(name, sde)
    sched = "karras" if isinstance(sde, EDM) else None

    def err(steps):
        mean, var, _, _ = exact_law_ode(name, sde, steps, options, sched)
        return abs(mean - m_lim) + abs(var - v_lim)

    e1, e2 = err(24), err(48)
    observed = math.log(e1 / e2) / math.log(2)
    assert observed > order - 0.3, (e1, e2, observed)


def exact_law_ode(name, sde, steps, options, schedule):
    """exact_law for any sampler; deterministic samplers need only two probes (output = A x_T + b)."""
    if sf.samplers.get(name).KIND != "ode":
        return exact_law(name, sde, steps, options)
    out = sf.sample(
        linear_score(sde),
        sde,
        (2, 1),
        sampler=name,
        steps=steps,
        backend="torch",
        schedule=schedule,
        dtype=torch.float64,
        **options,
    )
    x_T = sde.prior_sampling((2, 1), seed=0, sample_ids=torch.arange(2), dtype=torch.float64, backend="torch")[:, 0]
    A = (out[1, 0] - out[0, 0]) / (x_T[1] - x_T[0])
    b = out[0, 0] - A * x_T[0]
    return b.item(), (A**2 * sde.prior_std() ** 2).item(), 0.0, None


def test_euler_maruyama_matches_score_sde_recursion_on_its_grid():
    """On score_sde's grid (steps = N): dt = -1/N, and the exact law follows its recursion."""
    sde = VPSDE(N=30)
    mean, var, residual, nfe = exact_law("euler_maruyama", sde, 30)
    assert nfe == 30 and residual < 1e-9
    # independent float64 recursion of score_sde's EulerMaruyamaPredictor for N(M, C) data
    m, v = 0.0, 1.0
    times = torch.linspace(1.0, sde.eps, 30, dtype=torch.float64)
    dt = -1.0 / 30
    for i, t in enumerate(times):
        t = t.reshape(1)
        a, s, beta = sde.mean_coef(t).item(), sde.std(t).item(), sde.beta(t).item()
        denom = a**2 * C + s**2
        # x + (-beta x / 2 - beta * score) dt, score = -(x - a M)/denom
        A = 1 + (-0.5 * beta + beta / denom) * dt
        b = -beta * a * M / denom * dt
        m, v = A * m + b, A * A * v + (0.0 if i == 29 else beta * -dt)
    assert mean == pytest.approx(m, abs=1e-10) and var == pytest.approx(v, abs=1e-10)


def test_reverse_diffusion_uses_score_sde_tables_on_its_grid():
    sde = VESDE(0.01, 10, N=25)
    mean, var, _, _ = exact_law("reverse_diffusion", sde, 25)
    m, v = 0.0, 100.0
    times = torch.linspace(1.0, sde.eps, 25, dtype=torch.float64)
    for i, t in enumerate(times):
        idx = int(t * 24)
        sig = sde.discrete_sigmas[idx].item()
        adj = 0.0 if idx == 0 else sde.discrete_sigmas[idx - 1].item()
        s_t = sde.sigma(t.reshape(1)).item()
        g2 = sig**2 - adj**2
        A = 1 - g2 / (C + s_t**2)
        b = g2 * M / (C + s_t**2)
        m, v = A * m + b, A * A * v + (0.0 if i == 24 else g2)
    assert mean == pytest.approx(m, abs=1e-9) and var == pytest.approx(v, abs=1e-9)


# -- mixtures -----------------------------------------------------------------------------
MIXTURE = [
    ("pc", VESDE(0.01, 10), 200, {"norm": "batch"}),
    ("pc", VPSDE(), 200, {"norm": "batch", "predictor": "euler_maruyama"}),
    ("euler_maruyama", VPSDE(), 200, {}),
    ("reverse_diffusion", VESDE(0.01, 10), 200, {}),
    ("ancestral", VPSDE(), 200, {}),
    ("ddim", VPSDE(), 50, {}),
    ("ode_euler", VPSDE(), 100, {}),
    ("heun", EDM(), 18, {}),
    ("dpm_solver++", VPSDE(), 25, {}),
    ("dpm_solver++", EDM(), 25, {"variant": "2m-sde"}),
    ("annealed_langevin", VESDE(0.01, 10), 10, {"n_steps_each": 50}),
]


@pytest.mark.parametrize("name,sde,steps,options", MIXTURE, ids=[f"{c[0]}-{type(c[1]).__name__}" for c in MIXTURE])
def test_mixture_sliced_wasserstein(name, sde, steps, options):
    gm = sf.testing.GaussianMixture.ring(4, 3.0, 0.4)
    n = 4000
    x = sf.sample(gm.score_fn(sde), sde, (n, 2), sampler=name, steps=steps, seed=1, **options)
    exact = gm.sample(n, seed=2)
    floor = sliced_wasserstein(gm.sample(n, seed=3), exact)
    sw = sliced_wasserstein(x, exact)
    assert sw < 3 * floor + 0.05, (sw, floor)


# -- noise allocation, invariance ---------------------------------------------------------
SAMPLER_CASES = [
    ("pc", VESDE(0.01, 10), {"n_corrector": 2}),
    ("euler_maruyama", VPSDE(), {}),
    ("reverse_diffusion", VPSDE(), {}),
    ("ancestral", VESDE(0.01, 10), {}),
    ("ddim", VPSDE(), {"eta": 1.0}),
    ("heun", EDM(), {"s_churn": 40.0}),
    ("dpm_solver++", EDM(), {"variant": "3m", "eta": 1.0}),
    ("annealed_langevin", VESDE(0.01, 10), {"n_steps_each": 3}),
    ("langevin", VESDE(0.01, 10), {}),
]


@pytest.mark.parametrize("name,sde,options", SAMPLER_CASES, ids=[c[0] for c in SAMPLER_CASES])
def test_no_two_draws_share_a_counter(monkeypatch, name, sde, options):
    import importlib

    seen = []
    original = importlib.import_module("scorefast.ops.fused_update").apply

    def spy(x, terms, *, noise, seed, step, stream, **kw):
        if isinstance(noise, torch.Tensor) or noise != 0.0:
            seen.append((stream, int(step)))
        return original(x, terms, noise=noise, seed=seed, step=step, stream=stream, **kw)

    for mod in ("ops.fused_update", "ops.langevin_step", "ops.snr_langevin_step", "samplers.base"):
        monkeypatch.setattr(importlib.import_module(f"scorefast.{mod}"), "apply", spy)
    sf.sample(linear_score(sde), sde, (3, 2), sampler=name, steps=6, **options)
    assert seen, "the sampler drew no noise"
    assert len(seen) == len(set(seen)), "two draws share (stream, step)"
    S = sf.samplers.draws_per_step(sf.samplers.get(name), options)
    assert all(stream == STREAM_SAMPLER and 0 <= k < 6 * S for stream, k in seen)
    assert STREAM_PRIOR != STREAM_SAMPLER


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name,sde,options", SAMPLER_CASES[:6], ids=[c[0] for c in SAMPLER_CASES[:6]])
def test_sampler_batch_invariance_bitwise(backend, name, sde, options):

    def elementwise(x, t, **_):  # batch-invariant score
        return -x / (1.0 + t[:, None] ** 2)

    big = sf.sample(elementwise, sde, (1000, 5), sampler=name, steps=5, seed=3, backend=backend, **options)
    for ids in ([777], [5, 999, 0, 777, 3, 64, 500]):
        small = sf.sample(
            elementwise,
            sde,
            (len(ids), 5),
            sampler=name,
            steps=5,
            seed=3,
            backend=backend,
            sample_ids=torch.tensor(ids),
            **options,
        )
        assert torch.equal(small, big[ids])


@pytest.mark.parametrize("backend", backend_params(include_torch=False))
def test_backends_agree_after_one_step_and_stay_close(backend):
    sde = VPSDE()
    gm = sf.testing.GaussianMixture.ring(4, 3.0, 0.4)
    one = [
        sf.sample(gm.score_fn(sde), sde, (64, 2), sampler="euler_maruyama", steps=1, backend=b, denoise=False)
        for b in ("torch", backend)
    ]
    torch.testing.assert_close(one[0], one[1], atol=1e-5, rtol=1e-5)
    many = [
        sf.sample(gm.score_fn(sde), sde, (64, 2), sampler="euler_maruyama", steps=20, backend=b)
        for b in ("torch", backend)
    ]
    scale = many[0].abs().max().item()
    assert (many[0] - many[1]).abs().max().item() < 1e-4 * max(scale, 1.0)


# -- options ------------------------------------------------------------------------------
def test_sdedit_x_init_t_start_and_callback_and_progress():
    sde = VPSDE()
    x_init = torch.full((8, 2), 2.0)
    calls = []
    x, info = sf.sample(
        linear_score(sde),
        sde,
        (8, 2),
        sampler="ddim",
        steps=10,
        x_init=x_init,
        t_start=0.3,
        callback=calls.append,
        progress=True,
        return_info=True,
    )
    assert info["nfe"] == 10 and len(calls) == 10 and set(calls[0]) >= {"x", "i", "t", "denoised"}
    assert float(calls[0]["t"][0]) == pytest.approx(0.3)
    # deterministic DDIM from x_init noised at t=0.3 keeps memory of x_init (SDEdit), unlike from T
    assert (x.mean() - M).abs() < (2.0 - M)


def test_extra_args_reach_the_score_and_are_checked():
    sde = VPSDE()
    seen = {}

    def score(x, t, *, label):
        seen["label"] = label
        return -x

    sf.sample(score, sde, (4, 2), sampler="ddim", steps=3, extra_args={"label": torch.arange(4)})
    assert torch.equal(seen["label"], torch.arange(4))
    with pytest.raises(ValueError, match="extra_args"):
        sf.sample(score, sde, (4, 2), sampler="ddim", steps=3, extra_args={"label": torch.arange(3)})


def test_precision_bf16_close_to_fp32():
    sde = VPSDE()
    gm = sf.testing.GaussianMixture.ring(4, 3.0, 0.4)
    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.copy_(torch.eye(2))
        net.bias.zero_()

    def score(x, t):
        return gm.score(net(x), t, sde).to(torch.float32)

    a = sf.sample(score, sde, (2000, 2), sampler="dpm_solver++", steps=20, precision="fp32")
    b = sf.sample(score, sde, (2000, 2), sampler="dpm_solver++", steps=20, precision="bf16")
    assert a.dtype == b.dtype == torch.float32
    assert sliced_wasserstein(a, b) < 0.1


def test_schedule_options():
    sde = VPSDE()
    for schedule in ("uniform", "karras", torch.linspace(1.0, 1e-3, 12)):
        x, info = sf.sample(
            linear_score(sde), sde, (4, 1), sampler="ode_euler", steps=12, schedule=schedule, return_info=True
        )
        assert info["nfe"] == 12 and torch.isfinite(x).all()


# -- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"sampler": "euler"}, ValueError, "unknown sampler 'euler'.*pc"),
        ({"steps": 0}, ValueError, "steps"),
        ({"shape": (5,)}, ValueError, "shape"),
        ({"precision": "int8"}, ValueError, "precision"),
        ({"sampler": "ancestral", "sde": SubVPSDE()}, ValueError, "ancestral"),
        ({"sampler": "annealed_langevin", "sde": VPSDE()}, ValueError, "annealed_langevin"),
        ({"sampler": "heun", "s_churn": 1.0}, ValueError, "s_churn"),
        ({"sampler": "ddim", "eta": 2.0}, ValueError, "eta"),
        ({"sampler": "ddim", "snr": 0.1}, TypeError, "snr"),
        ({"schedule": "cosine"}, ValueError, "schedule"),
        ({"t_start": 5.0}, ValueError, "t_start"),
        ({"x_init": torch.zeros(3, 2), "t_start": 0.5}, ValueError, "x_init"),
        ({"sample_ids": torch.arange(3)}, ValueError, "sample_ids"),
        ({"sde": "vp"}, TypeError, "sde"),
        ({"sde": lambda: VPSDE(N=10)}, ValueError, "N: score_sde's VP tables"),  # beta_max / N = 2
    ],
)
def test_bad_input(kwargs, exc, match):
    args = {"sde": VPSDE(), "shape": (4, 2), "sampler": "ddim", "steps": 5}
    args.update(kwargs)
    sde = args.pop("sde")
    shape = args.pop("shape")
    with pytest.raises(exc, match=match):
        sde = sde() if callable(sde) else sde
        sf.sample(lambda x, t: -x, sde, shape, **args)


def test_score_of_wrong_shape_and_non_finite_score():
    sde = VPSDE()
    with pytest.raises(ValueError, match="score_fn"):
        sf.sample(lambda x, t: x[:, :1], sde, (4, 2), sampler="ddim", steps=5)

    def bad(x, t):
        return torch.where(t[:, None] < 0.5, torch.full_like(x, float("nan")), -x)

    with pytest.raises(sf.NonFiniteError, match=r"step 3 \(t = 0\.4"):
        sf.sample(bad, sde, (4, 2), sampler="ddim", steps=6, schedule="uniform")


# -- rk45 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sde", [VPSDE(), VESDE(0.01, 10), SubVPSDE()], ids=lambda s: type(s).__name__)
def test_rk45_matches_closed_form_probability_flow(sde):
    """Gaussian data: x_eps = a_e M + sqrt(V_e / V_T) (x_T - a_T M), then Tweedie; per sample."""
    B = 16
    x, info = sf.sample(
        linear_score(sde),
        sde,
        (B, 1),
        sampler="rk45",
        rtol=1e-7,
        atol=1e-7,
        seed=2,
        dtype=torch.float64,
        backend="torch",
        return_info=True,
    )
    x_T = sde.prior_sampling((B, 1), seed=2, sample_ids=torch.arange(B), dtype=torch.float64, backend="torch")

    def coefs(t):
        t = torch.tensor([t], dtype=torch.float64)
        a, s = sde.mean_coef(t).item(), sde.std(t).item()
        return a, a * a * C + s * s

    a_T, V_T = coefs(sde.T)
    a_e, V_e = coefs(sde.eps)
    x_eps = a_e * M + math.sqrt(V_e / V_T) * (x_T - a_T * M)
    expected = M + a_e * C / V_e * (x_eps - a_e * M)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
    assert info["nfe_per_sample"].shape == (B,) and info["nfe"] == int(info["nfe_per_sample"].max())


def test_rk45_per_sample_steps_and_batch_invariance():
    sde = VESDE(0.01, 10)

    def elementwise(x, t, **_):
        return -x / (1.0 + t[:, None] ** 2) - 0.3 * torch.sin(3 * x)

    big, info = sf.sample(elementwise, sde, (200, 3), sampler="rk45", rtol=1e-4, atol=1e-4, seed=3, return_info=True)
    nfe = info["nfe_per_sample"]
    assert nfe.min() < nfe.max(), "every sample took the same steps: step sizes are not per sample"
    for ids in ([150], [5, 199, 0, 150, 77]):
        small, small_info = sf.sample(
            elementwise,
            sde,
            (len(ids), 3),
            sampler="rk45",
            rtol=1e-4,
            atol=1e-4,
            seed=3,
            sample_ids=torch.tensor(ids),
            return_info=True,
        )
        assert torch.equal(small, big[ids])
        assert torch.equal(small_info["nfe_per_sample"], nfe[ids])


@pytest.mark.parametrize("t0,t1", [(0.0, 2.0), (2.0, 0.5)])
def test_rk45_solver_both_directions(t0, t1):
    from scorefast.solvers import solve

    y0 = torch.tensor([[1.0], [2.0], [-0.5]], dtype=torch.float64)
    sol = solve(lambda y, t: -t[:, None] * y, y0, t0, t1, rtol=1e-9, atol=1e-12)
    expected = y0 * math.exp(-(t1**2 - t0**2) / 2)
    torch.testing.assert_close(sol.y, expected, atol=1e-8, rtol=1e-8)
    assert (sol.steps > 0).all()
    with pytest.raises(ValueError, match="rtol"):
        solve(lambda y, t: y, y0, 0.0, 1.0, rtol=0.0)


def test_score_sees_a_time_tensor_changed_in_place():
    """The context reuses the converted time of a repeated time tensor (Langevin's fixed t), but
    never after the tensor was written in place."""
    from scorefast.samplers.base import Context

    seen = []

    def score_fn(x, t):
        seen.append(t.clone())
        return -x

    ctx = Context(score_fn, VPSDE(), torch.linspace(1, 0.001, 3, dtype=torch.float64), 0, torch.arange(2), 1)
    x, t = torch.zeros(2, 3), torch.full((2,), 0.5, dtype=torch.float64)
    ctx.score(x, t)
    ctx.score(x, t)
    t.fill_(0.25)
    ctx.score(x, t)
    assert [v.tolist() for v in seen] == [[0.5, 0.5], [0.5, 0.5], [0.25, 0.25]]
