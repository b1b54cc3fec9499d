"""Rectified flow: the SDE, ``from_velocity``, exact mixture velocities, every sampler, the likelihood,
``fm_loss`` / ``TrainStep(loss="fm")`` and ``scorefast train --sde rectified_flow``.

Independence: every reference below is written from rectified flow's closed forms (x_t = (1 - t) x_0
+ t n, v = n - x_0) in float64 and never read back from ``RectifiedFlow`` (the grid excepted, which
is pinned to diffusers' own), so a wrong coefficient in the SDE shows as a mismatch, not as a
self-consistent wrong answer.  Sampler checks follow DESIGN "Testing samplers": exact laws with no
Monte-Carlo noise for Gaussian data (the velocity is linear in x), mixtures against the floor.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import warnings

import numpy as np
import pytest
import torch

import scorefast as sf
from scorefast import graphs, models
from scorefast.cli import main
from scorefast.rng import STREAM_DSM, STREAM_SAMPLER, STREAM_TIMES
from scorefast.sde import VPSDE, RectifiedFlow
from scorefast.testing import GaussianMixture, sliced_wasserstein
from scorefast.train import TrainStep
from tests.test_train import _batch, _params, _step

M, C = 0.7, 0.25  # 1-D Gaussian data N(M, C)


def var_t(t):
    """Var x_t = (1 - t)^2 C + t^2 for N(M, C) data."""
    return (1 - t) ** 2 * C + t**2


def gaussian_velocity(x, t, **_):
    """E[n - x_0 | x_t] for N(M, C) data: (t - (1 - t) C) / V (x - (1 - t) M) - M (linear in x)."""
    t = t.double().reshape(-1, 1)
    x64 = x.double()
    return ((t - (1 - t) * C) / var_t(t) * (x64 - (1 - t) * M) - M).to(x.dtype)


class ClosedFormRF:
    """Rectified flow's marginals written out (a = 1 - t, s = t, a' = -1, s' = 1), for GaussianMixture."""

    def marginal_prob(self, x0, t):
        return (1 - t).reshape(-1, *([1] * (x0.dim() - 1))) * x0, t

    def marginal_rates(self, t):
        return -torch.ones_like(t), torch.ones_like(t)


REF = ClosedFormRF()
RING = GaussianMixture.ring(4, 3.0, 0.4)


def shifted(u, shift):
    return shift * u / (1 + (shift - 1) * u)


# -- the SDE ------------------------------------------------------------------------------
def test_coefficients_and_forward_sde_reproduce_the_marginals():
    sde = RectifiedFlow()
    t = torch.linspace(0.01, 0.99, 41, dtype=torch.float64)
    assert torch.equal(sde.mean_coef(t), 1 - t) and torch.equal(sde.std(t), t)
    torch.testing.assert_close(sde.alpha_bar(t), (1 - t) ** 2, rtol=1e-15, atol=0)
    x0 = torch.randn(41, 3, dtype=torch.float64)
    mean, std = sde.marginal_prob(x0, t)
    torch.testing.assert_close(mean, (1 - t)[:, None] * x0, rtol=1e-15, atol=0)
    assert torch.equal(std, t)
    # the forward SDE dx = f x dt + g dW keeps these marginals: (ln a)' = f, (s^2)' = 2 f s^2 + g^2
    # (central differences of the closed forms, not of the SDE's own methods)
    h = 1e-6
    f, g2 = sde.drift_coef(t), sde.diffusion(t) ** 2
    dlog_a = (torch.log(1 - (t + h)) - torch.log(1 - (t - h))) / (2 * h)
    ds2 = ((t + h) ** 2 - (t - h) ** 2) / (2 * h)
    torch.testing.assert_close(f, dlog_a, rtol=1e-7, atol=0)
    torch.testing.assert_close(g2, ds2 - 2 * f * t**2, rtol=1e-7, atol=0)
    drift, diffusion = sde.sde(x0, t)
    torch.testing.assert_close(drift, f[:, None] * x0)
    torch.testing.assert_close(diffusion, g2.sqrt())
    # the base class's generic rates (a' = f a, s' = (g^2 + 2 f s^2)/(2 s)) agree with (-1, 1)
    for da, ds in (sde.marginal_rates(t), sf.sde.SDE.marginal_rates(sde, t)):
        torch.testing.assert_close(da, -torch.ones_like(t))
        torch.testing.assert_close(ds, torch.ones_like(t))
    # probability-flow drift a x + b s with the exact Gaussian score is the exact velocity
    x = torch.randn(41, 1, dtype=torch.float64)
    score = -(x - ((1 - t) * M)[:, None]) / var_t(t)[:, None]
    torch.testing.assert_close(
        sde.reverse_drift(x, t, score, probability_flow=True), gaussian_velocity(x, t), rtol=1e-12, atol=1e-12
    )
    assert sde.prior_std() == 1.0 and sde.N is None  # no score_sde tables: steps == 1000 is no "own grid"


def test_exact_transition_is_the_forward_kernel_and_a_semigroup():
    sde = RectifiedFlow(3.0)
    t2, t1, t0 = (torch.full((3,), v, dtype=torch.float64) for v in (0.9, 0.6, 0.2))
    c_m1, G = sde.discretize_coefs(t2, t1)
    c = (1 - t2) / (1 - t1)
    torch.testing.assert_close(c_m1, c - 1, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(G, torch.sqrt(t2**2 - c**2 * t1**2), rtol=1e-14, atol=0)

    def kernel(t, t_next):
        c_m1, G = sde.exact_transition(t, t_next)
        return c_m1 + 1, G

    # x_{t2} = c21 (c10 x_{t0} + G10 z) + G21 z': one kernel t0 -> t2
    (a, g_a), (b, g_b), (d, g_d) = kernel(t2, t1), kernel(t1, t0), kernel(t2, t0)
    torch.testing.assert_close(a * b, d, rtol=1e-14, atol=0)
    torch.testing.assert_close(a**2 * g_b**2 + g_a**2, g_d**2, rtol=1e-13, atol=0)
    # to the data end (t_next = 0): c = 1 - t, G = t
    c, G = kernel(t2, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(c, 1 - t2)
    torch.testing.assert_close(G, t2)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_grid_is_diffusers_flow_match_grid(shift):
    """T and eps are diffusers' numbers; the grid is FlowMatchEulerDiscreteScheduler's (from 1 - 1/1000)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sde = RectifiedFlow(shift)
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    assert sde.T == pytest.approx(shifted(0.999, shift), rel=1e-15) and sde.T < 1
    for steps in (2, 5, 28, 1000, 1500):
        ours = sde.grid(steps)
        assert ours[0] == sde.T and bool((ours[1:] < ours[:-1]).all())
        sched.set_timesteps(sigmas=np.linspace(1 - 1 / 1000, sched.sigma_min, steps))
        torch.testing.assert_close(ours, sched.sigmas[:-1].double(), rtol=2e-7, atol=2e-8)
        sched.set_timesteps(steps)  # the default grid starts at sigma = 1: within 1/1000 in u
        assert (ours - sched.sigmas[:-1].double()).abs().max() <= 1e-3 + 1e-7
        assert float(ours[-1]) == pytest.approx(float(sched.sigmas[-2]), rel=1e-6)  # eps, the last sigma
        assert sched.sigmas[-1] == 0  # the data end: our closing Tweedie step eps -> 0
    assert sde.eps == pytest.approx(float(sched.sigmas[-2]), rel=1e-6)
    # the network's time: diffusers' timesteps are sigma * 1000, our "t*1000" map
    tmap = sf.adapters.resolve_time_map(sde, "t*1000")
    sched.set_timesteps(sigmas=np.linspace(1 - 1 / 1000, sched.sigma_min, 7))
    torch.testing.assert_close(tmap(sde.grid(7)).float(), sched.timesteps, rtol=1e-6, atol=1e-4)


def test_bad_shift_and_checkpoint_entry(tmp_path):
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="shift"):
            RectifiedFlow(bad)
    sde = RectifiedFlow(3.0)
    assert sde.config() == {"shift": 3.0} and repr(sde) == "RectifiedFlow(shift=3.0)"
    torch.manual_seed(0)
    net = models.build("MLP", dim=2, hidden=16, layers=2)
    path = models.save(tmp_path / "rf.safetensors", net, sde=sde, shape=(2,), parameterisation="velocity")
    meta = models.read_metadata(path)
    assert meta["sde"] == "RectifiedFlow" and meta["parameterisation"] == "velocity"
    score_fn, loaded, shape = models.load(path)
    assert isinstance(loaded, RectifiedFlow) and loaded.shift == 3.0 and shape == (2,)
    x, t = torch.randn(5, 2), torch.rand(5) * 0.9 + 0.05
    with torch.no_grad():
        v = net(x, t)
        torch.testing.assert_close(score_fn(x, t), -(x + (1 - t)[:, None] * v) / t[:, None])


# -- from_velocity and exact velocities ---------------------------------------------------
def test_from_velocity_score_and_coefficients():
    sde = RectifiedFlow(3.0)
    t = torch.linspace(0.01, 0.99, 9, dtype=torch.float64)
    A, B = sf.adapters.velocity_coefs(sde, t)
    torch.testing.assert_close(A, -1 / t, rtol=1e-15, atol=0)
    torch.testing.assert_close(B, -(1 - t) / t, rtol=1e-15, atol=0)
    seen = []

    def net(x, t_net):
        seen.append(t_net)
        return gaussian_velocity(x, t_net)

    score_fn = sf.adapters.from_parameterisation(net, sde, "velocity")
    x = torch.randn(9, 1, dtype=torch.float64)
    exact = -(x - ((1 - t) * M)[:, None]) / var_t(t)[:, None]
    torch.testing.assert_close(score_fn(x, t), exact, rtol=1e-12, atol=1e-12)
    assert torch.equal(seen[-1], t)  # default time map: t itself
    torch.testing.assert_close(score_fn.output(x, t), gaussian_velocity(x, t))
    thousand = sf.adapters.from_velocity(lambda x, tn: seen.append(tn) or x, sde, time_map="t*1000")
    thousand(x, t)
    torch.testing.assert_close(seen[-1], 1000 * t)
    # a bf16 network: the conversion runs in fp32
    low = sf.adapters.from_velocity(lambda x, tn: gaussian_velocity(x, tn).bfloat16(), sde)
    assert low(x.float(), t.float()).dtype == torch.float32
    # the exact mixture velocity gives the exact mixture score (2-D, non-isotropic components)
    gm = GaussianMixture([1.0, 2.0], [[1.0, 0.0], [-1.0, 2.0]], [[[0.5, 0.1], [0.1, 0.3]], [[0.2, 0.0], [0.0, 0.4]]])
    y = torch.randn(9, 2, dtype=torch.float64)
    got = sf.adapters.from_velocity(gm.velocity_fn(REF), sde)(y, t)
    torch.testing.assert_close(got, gm.score(y, t, REF), rtol=1e-10, atol=1e-10)


def test_mixture_velocity_solves_the_continuity_equation():
    """d/dt log p_t + div v + v . grad log p_t = 0 (float64; d/dt by central differences), and finite at both ends."""
    gm = GaussianMixture([1.0, 2.0, 1.5], [[1.0, 0.0], [-1.0, 2.0], [0.0, -2.0]], [0.3, 0.5, 0.2])
    sde = RectifiedFlow()
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    t = torch.tensor([0.02, 0.2, 0.4, 0.6, 0.8, 0.97], dtype=torch.float64)
    h = 1e-5
    dlogp = (gm.log_prob(x, t + h, REF) - gm.log_prob(x, t - h, REF)) / (2 * h)
    v = gm.velocity(x, t, sde)
    jac = torch.func.vmap(torch.func.jacrev(lambda xi, ti: gm.velocity(xi[None], ti[None], sde)[0]))(x, t)
    div = jac.diagonal(dim1=1, dim2=2).sum(1)
    residual = dlogp + div + (v * gm.score(x, t, REF)).sum(1)
    assert residual.abs().max() < 1e-6, residual
    for end in (0.0, 1.0):
        assert torch.isfinite(gm.velocity(x, torch.full((6,), end, dtype=torch.float64), sde)).all()
    # one component: the linear closed form; under VP the velocity is the probability-flow drift
    one = GaussianMixture([1.0], [[M]], C)
    y = torch.randn(6, 1, dtype=torch.float64)
    torch.testing.assert_close(one.velocity(y, t, sde), gaussian_velocity(y, t), rtol=1e-12, atol=1e-12)
    vp = VPSDE()
    drift = vp.reverse_drift(x, t, gm.score(x, t, vp), probability_flow=True)
    torch.testing.assert_close(gm.velocity(x, t, vp), drift, rtol=1e-10, atol=1e-10)


# -- samplers: exact laws for Gaussian data (no Monte-Carlo noise) ------------------------
def _law(name, sde, steps, **options):
    """(mean, var, residual) of the output for N(M, C) data: regress it on x_T, 1 and the declared draws."""
    module = sf.samplers.get(name)
    K = steps * sf.samplers.draws_per_step(module, options)
    B = 2 * (K + 2) + 16
    score = sf.adapters.from_velocity(gaussian_velocity, sde)
    x = sf.sample(
        score, sde, (B, 1), sampler=name, steps=steps, seed=5, dtype=torch.float64, backend="torch", **options
    )
    ids = torch.arange(B)
    draw = dict(seed=5, sample_ids=ids, dtype=torch.float64, backend="torch")
    x_T = sde.prior_sampling((B, 1), **draw)[:, 0]
    zs = [sf.randn((B, 1), step=k, stream=STREAM_SAMPLER, **draw)[:, 0] for k in range(K)]
    design = torch.stack([x_T, torch.ones(B, dtype=torch.float64), *zs], 1)
    coef = torch.linalg.lstsq(design, x[:, 0:1]).solution[:, 0]
    residual = (design @ coef - x[:, 0]).abs().max().item()
    return coef[1].item(), (coef[0] ** 2 + (coef[2:] ** 2).sum()).item(), residual


def _flow_limit(T, eps):
    """The exact flow from N(0, 1) at T to eps, then the samplers' closing Tweedie step x - eps v (both
    affine): x_eps - (1 - eps) M = sqrt(V_eps / V_T) (x_T - (1 - T) M), v = k (x - (1 - eps) M) - M."""
    k = (eps - (1 - eps) * C) / var_t(eps)
    gain = (1 - eps * k) * math.sqrt(var_t(eps) / var_t(T))
    return M - gain * (1 - T) * M, gain**2


ODE_ORDER = [("ode_euler", {}, 1), ("heun", {}, 2), ("dpm_solver++", {}, 2), ("rk45", {"rtol": 1e-8, "atol": 1e-8}, 0)]


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("name,options,order", ODE_ORDER, ids=[c[0] for c in ODE_ORDER])
def test_ode_samplers_converge_to_the_exact_flow(name, options, order, shift):
    """Each ODE sampler's law (A x_T + b) tends to the exact flow at its order (rk45: to its tolerance)."""
    sde = RectifiedFlow(shift)
    m_lim, v_lim = _flow_limit(sde.T, sde.eps)

    def err(steps):
        mean, var, residual = _law(name, sde, steps, **options)
        assert residual < (1e-7 if order == 0 else 1e-12)  # rk45's per-sample steps: affine to its tolerance
        return abs(mean - m_lim) + abs(var - v_lim)

    if order == 0:
        assert err(2) < 1e-7
        return
    e1, e2 = err(24), err(48)
    assert math.log2(e1 / e2) > order - 0.3, (e1, e2)
    assert e2 < 0.04


def test_ddim_is_the_euler_step_of_the_flow():
    """On RectifiedFlow DDIM (eta 0) is exactly Euler on dx/dt = v, closing Tweedie step included."""
    sde = RectifiedFlow(3.0)
    score = sf.adapters.from_velocity(RING.velocity_fn(REF), sde)
    kw = dict(steps=9, seed=2, dtype=torch.float64, backend="torch")
    a = sf.sample(score, sde, (64, 2), sampler="ddim", **kw)
    b = sf.sample(score, sde, (64, 2), sampler="ode_euler", **kw)
    torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    # and Euler written out on the velocity over the same grid, ending with the step eps -> 0
    x = sde.prior_sampling((64, 2), seed=2, dtype=torch.float64, backend="torch")
    times = torch.cat([sde.grid(9), torch.zeros(1, dtype=torch.float64)])
    for t, t_next in itertools.pairwise(times):
        x = x + (t_next - t) * RING.velocity(x, t.expand(64), REF)
    torch.testing.assert_close(b, x, rtol=1e-11, atol=1e-11)


def _recursion(name, times):
    """(mean, var) of euler_maruyama / ancestral for N(M, C) data from N(0, 1), written from the closed
    forms: f = -1/(1 - t), g^2 = 2t/(1 - t), kernel c = (1 - t)/(1 - t'), G^2 = t^2 - c^2 t'^2."""
    m, v = 0.0, 1.0
    nxt = [*times[1:], 0.0]
    for i, (t, tn) in enumerate(zip(times, nxt)):
        last = i == len(times) - 1
        a, V = 1 - t, var_t(t)  # score = -(x - a M) / V
        if name == "euler_maruyama":
            dt, f, g2 = tn - t, -1 / (1 - t), 2 * t / (1 - t)
            A, b, noise2 = 1 + (f + g2 / V) * dt, -g2 * a * M / V * dt, g2 * abs(dt)
        else:
            c = (1 - t) / (1 - tn)
            G2 = t * t - c * c * tn * tn
            A, b, noise2 = (1 - G2 / V) / c, G2 * a * M / (V * c), G2 * tn * tn / (t * t)
        m, v = A * m + b, A * A * v + (0.0 if last else noise2)
    return m, v


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("name", ["euler_maruyama", "ancestral"])
def test_stochastic_samplers_follow_the_exact_recursion(name, shift):
    sde = RectifiedFlow(shift)
    errors = []
    for steps in (6, 30):
        mean, var, residual = _law(name, sde, steps)
        assert residual < 1e-10, "the output is not affine in the declared draws"
        m, v = _recursion(name, sde.grid(steps).tolist())
        assert mean == pytest.approx(m, abs=1e-10) and var == pytest.approx(v, abs=1e-10)
        errors.append(abs(mean - M) + abs(var - C))
    # and the law approaches the data's (ancestral's posterior variance is low on coarse grids)
    assert errors[1] < errors[0] and errors[1] < 0.1, errors


# -- samplers: the mixture against the Monte-Carlo floor ----------------------------------
N_MIX = 4000
MIXTURE = [
    ("ode_euler", 40, {}),
    ("heun", 12, {}),
    ("dpm_solver++", 25, {}),
    ("dpm_solver++", 25, {"variant": "3m"}),
    ("dpm_solver++", 50, {"variant": "2m-sde"}),
    ("rk45", 2, {}),
    ("euler_maruyama", 200, {}),
    ("ancestral", 200, {}),
]


@pytest.fixture(scope="module")
def ring_reference():
    """(exact samples, floor): the median sliced W1 between independent exact sets of the same size."""
    exact = RING.sample(N_MIX, seed=2)
    floors = [sliced_wasserstein(RING.sample(N_MIX, seed=s), exact, n_proj=256, p=1) for s in range(10, 17)]
    return exact, statistics.median(floors)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("name,steps,options", MIXTURE, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in MIXTURE])
def test_mixture_within_the_monte_carlo_floor(ring_reference, name, steps, options, shift):
    exact, floor = ring_reference
    sde = RectifiedFlow(shift)
    score = sf.adapters.from_velocity(RING.velocity_fn(REF), sde)
    x = sf.sample(score, sde, (N_MIX, 2), sampler=name, steps=steps, seed=1, **options)
    sw = sliced_wasserstein(x, exact, n_proj=256, p=1)
    assert sw < 2 * floor, (sw, floor)


# -- likelihood ---------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_likelihood_matches_the_exact_log_density(shift):
    gm = GaussianMixture.ring(4, 2.0, 0.5)
    sde = RectifiedFlow(shift)
    x = gm.sample(16, seed=4)
    score = sf.adapters.from_velocity(gm.velocity_fn(REF), sde)
    exact = -gm.log_prob(x, torch.full((16,), 1e-5, dtype=torch.float64), REF)
    p_T = lambda z: gm.log_prob(z, torch.full((z.shape[0],), sde.T, dtype=torch.float64), REF)  # noqa: E731
    kw = dict(divergence="exact", rtol=1e-7, atol=1e-7)
    nll, bpd = sf.log_likelihood(score, sde, x, prior_logp=p_T, **kw)
    torch.testing.assert_close(nll, exact, atol=2e-6, rtol=0)
    torch.testing.assert_close(bpd, nll / (2 * math.log(2)))
    default, _ = sf.log_likelihood(score, sde, x, **kw)  # N(0, I) at T: off by O(1 - T) per dimension
    assert (default - exact).abs().max() < 5e-3


# -- graphs, schedules, SDEdit ------------------------------------------------------------
@pytest.mark.parametrize(
    "name,options", [("euler_maruyama", {}), ("ancestral", {}), ("heun", {}), ("dpm_solver++", {"variant": "3m"})]
)
def test_replay_equals_eager(name, options):
    sde = RectifiedFlow(3.0)
    score = sf.adapters.from_velocity(RING.velocity_fn(REF), sde)
    kw = dict(sampler=name, steps=9, seed=5, return_info=True, **options)
    a, ia = sf.sample(score, sde, (33, 2), **kw)
    with warnings.catch_warnings(), graphs.emulated():
        warnings.simplefilter("error")
        b, ib = sf.sample(score, sde, (33, 2), cuda_graph=True, **kw)
    assert torch.equal(a, b) and ia["nfe"] == ib["nfe"] and ib["graphed"] and torch.isfinite(a).all()


def test_schedules_sdedit_and_nfe():
    sde = RectifiedFlow(3.0)
    score = sf.adapters.from_velocity(RING.velocity_fn(REF), sde)
    for schedule in ("uniform", "karras", None):
        x, info = sf.sample(score, sde, (8, 2), sampler="heun", steps=6, schedule=schedule, return_info=True)
        assert torch.isfinite(x).all() and info["nfe"] == 2 * 6 - 1
    x_init = RING.sample(8, seed=1).float()
    x = sf.sample(score, sde, (8, 2), sampler="ode_euler", steps=30, x_init=x_init, t_start=0.3)
    assert (x - x_init).abs().mean() < 0.5  # SDEdit from t = 0.3 stays near its start
    with pytest.raises(ValueError, match="t_start"):
        sf.sample(score, sde, (8, 2), sampler="ode_euler", x_init=x_init, t_start=1.0)  # t = 1: no score there


# -- flow-matching loss and training ------------------------------------------------------
def _net(y, t):
    return 0.3 * y * (1 + t[:, None]) - 0.2


@pytest.mark.parametrize(
    "shift,kw",
    [(1.0, {}), (3.0, {"reduce_mean": True}), (3.0, {"t_dist": "logit_normal", "logit_mean": 0.5, "logit_std": 0.8})],
)
def test_fm_loss_matches_the_float64_reference(shift, kw):
    sde = RectifiedFlow(shift)
    B, D = 64, 3
    x = torch.randn(B, D, dtype=torch.float64)
    got = sf.losses.fm_loss(_net, x, sde, seed=3, step=7, **kw)
    draw = dict(seed=3, step=7, dtype=torch.float64)
    if kw.get("t_dist") == "logit_normal":  # SD3: u = sigmoid(m + s n), n from stream 4
        u = torch.sigmoid(kw["logit_mean"] + kw["logit_std"] * sf.randn((B, 1), stream=STREAM_TIMES, **draw)[:, 0])
    else:
        u = sf.rand((B, 1), stream=STREAM_TIMES, **draw)[:, 0]
    t = shifted(u, shift)
    z = sf.randn((B, D), stream=STREAM_DSM, **draw)
    x_t = (1 - t)[:, None] * x + t[:, None] * z
    sq = (_net(x_t, t) - (z - x)) ** 2
    ref = (sq.mean(1) if kw.get("reduce_mean") else sq.sum(1)).mean()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    f32 = sf.losses.fm_loss(lambda y, t: _net(y, t).float(), x.float(), sde, seed=3, step=7, **kw)
    assert f32.item() == pytest.approx(ref.item(), rel=1e-5)


def test_fm_fused_backward_matches_autograd_and_the_minimiser_is_the_velocity():
    sde = RectifiedFlow(3.0)
    torch.manual_seed(0)
    net = models.build("MLP", dim=2, hidden=16, layers=2).double()
    x = torch.randn(32, 2, dtype=torch.float64)
    sf.losses.fm_loss(net, x, sde, seed=1, step=2).backward()
    fused = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    u = sf.rand((32, 1), seed=1, step=2, stream=STREAM_TIMES, dtype=torch.float64)[:, 0]
    t = shifted(u, 3.0)
    z = sf.randn((32, 2), seed=1, step=2, stream=STREAM_DSM, dtype=torch.float64)
    ((net((1 - t)[:, None] * x + t[:, None] * z, t) - z + x) ** 2).sum(1).mean().backward()
    for p, g in zip(net.parameters(), fused):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)
    # E ||v - (z - x_0)||^2 is least at the exact velocity
    data = M + math.sqrt(C) * torch.randn(100_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    losses = {
        th: sf.losses.fm_loss(lambda y, t, th=th: gaussian_velocity(y, t) * (1 + th), data, sde, seed=1).item()
        for th in (-0.1, 0.0, 0.1)
    }
    assert losses[0.0] < losses[-0.1] and losses[0.0] < losses[0.1], losses


def test_fm_loss_and_train_step_bad_input():
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="sde"):
        sf.losses.fm_loss(_net, x, VPSDE())
    with pytest.raises(ValueError, match="t_dist"):
        sf.losses.fm_loss(_net, x, RectifiedFlow(), t_dist="mode")
    with pytest.raises(ValueError, match="logit_std"):
        sf.losses.fm_loss(_net, x, RectifiedFlow(), t_dist="logit_normal", logit_std=0.0)
    with pytest.raises(ValueError, match="velocity_fn"):
        sf.losses.fm_loss(lambda y, t: y[:, :1], x, RectifiedFlow())
    model = models.build("MLP", dim=2, hidden=8, layers=2)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="RectifiedFlow"):
        TrainStep(model, opt, "fm", sde=VPSDE())
    with pytest.raises(ValueError, match="parameterisation"):
        TrainStep(model, opt, "fm", sde=RectifiedFlow(), parameterisation="eps")
    with pytest.raises(ValueError, match="dsm"):
        TrainStep(model, opt, "dsm", sde=RectifiedFlow())


def test_fm_train_step_resumes_bitwise(tmp_path):
    """5 steps + save + load into a fresh TrainStep + 5 steps == 10 uninterrupted steps, bitwise."""
    kw = dict(loss="fm", sde=RectifiedFlow(3.0), ema=0.9, warmup=3, grad_clip=0.5)
    logit = dict(kw, loss_kwargs={"t_dist": "logit_normal"})
    a, b = _step(**logit), _step(**logit)
    assert a.parameterisation == "velocity"
    for n in range(10):
        a(_batch(n))
        if n < 5:
            b(_batch(n))
    b.save(tmp_path / "state.safetensors")
    c = _step(seed=123, **logit)
    c.load(tmp_path / "state.safetensors")
    for n in range(5, 10):
        c(_batch(n))
    assert all(torch.equal(p, q) for p, q in zip(_params(a), _params(c)))
    assert all(torch.equal(p, q) for p, q in zip(a.ema.shadow, c.ema.shadow))
    with pytest.raises(ValueError, match="loss_kwargs"):  # uniform t: another loss setting, refused
        _step(**kw).load(tmp_path / "state.safetensors")


def test_flow_matching_trains_a_small_mlp_end_to_end():
    """A tiny MLP on toy2d for 400 steps: the loss falls and heun samples land near the data."""
    from scorefast.train import data

    torch.manual_seed(0)
    train = data.toy2d(4000)
    model = models.build("MLP", dim=2, hidden=64, layers=3)
    sde = RectifiedFlow()
    step = TrainStep(model, torch.optim.Adam(model.parameters(), lr=3e-3), "fm", sde=sde, ema=0.99, grad_clip=1.0)
    losses = [float(step(train[data.batch_indices(len(train), 256, seed=0, step=n)])) for n in range(400)]
    assert sum(losses[-50:]) < 0.8 * sum(losses[:50]), (losses[:5], losses[-5:])
    gm = GaussianMixture.builtin()
    exact = gm.sample(2000, seed=1).float()
    floor = sliced_wasserstein(gm.sample(2000, seed=2).float(), exact, n_proj=256, p=1)
    score = sf.adapters.from_velocity(model, sde)
    with torch.no_grad(), step.ema.swap():
        x = sf.sample(score, sde, (2000, 2), sampler="heun", steps=10, seed=3)
    untrained = sliced_wasserstein(sde.prior_sampling((2000, 2), seed=3), exact, n_proj=256, p=1)
    got = sliced_wasserstein(x, exact, n_proj=256, p=1)
    assert got < 3 * floor < untrained, (got, floor, untrained)


def test_cli_trains_and_samples_a_rectified_flow(tmp_path):
    out = tmp_path / "rf"
    base = ["train", "--data", "toy2d", "--sde", "rectified_flow", "--batch", "8", "--out", str(out), "--no-progress"]
    assert main([*base, "--steps", "3", "--no-samples"]) == 0
    meta = models.read_metadata(out / "model.safetensors")
    assert (
        meta["sde"] == "RectifiedFlow"
        and meta["parameterisation"] == "velocity"
        and meta["sde_kwargs"] == {"shift": 1.0}
    )
    _, sde, shape = models.load(out / "model.safetensors")
    assert isinstance(sde, RectifiedFlow) and shape == (2,)
    with pytest.raises(SystemExit, match=r"sde: .* trained with 'RectifiedFlow'"):  # resuming a flow-matching run as VP
        main([*base[:4], "vp", *base[5:], "--steps", "4", "--no-samples"])
    sample = ["sample", "--model", str(out / "model.safetensors"), "--sampler", "heun", "--steps", "4", "--n", "10"]
    assert main([*sample, "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "s" / "timing.json").read_text())
    assert report["sde"] == "RectifiedFlow(shift=1.0)" and report["nfe_per_sample"] == 7


@pytest.mark.cuda
def test_cuda_flow_matching_step_and_captured_sampling():
    """On a GPU: fm training steps stay finite; captured sampling on RectifiedFlow equals eager."""
    sde = RectifiedFlow(3.0)
    torch.manual_seed(0)
    model = models.build("MLP", dim=2, hidden=32, layers=2).cuda()
    step = TrainStep(model, torch.optim.Adam(model.parameters(), lr=1e-3), "fm", sde=sde, ema=0.9)
    x = RING.sample(256, seed=1).float().cuda()
    assert all(torch.isfinite(step(x)) for _ in range(3))
    score = sf.adapters.from_velocity(RING.velocity_fn(REF), sde)
    for name in ("heun", "euler_maruyama", "ancestral", "dpm_solver++"):
        kw = dict(sampler=name, steps=9, seed=5, device="cuda", return_info=True)
        a, ia = sf.sample(score, sde, (64, 2), **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a capture that falls back to eager fails the test
            b, ib = sf.sample(score, sde, (64, 2), cuda_graph=True, **kw)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert ia["nfe"] == ib["nfe"] and ib["graphed"]
