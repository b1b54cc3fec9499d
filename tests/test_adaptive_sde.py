"""``sampler="adaptive_sde"`` (Jolicoeur-Martineau et al. 2021): laws, mixture, invariance, noise, NaN.

The step sizes depend on the noise (accept/reject on an error estimate that contains it), so the
output is not affine in the draws and no exact recursion exists: the law is checked by moments of a
64-D Gaussian (dimensions independent, so the per-dimension variance averages 64 estimates) and by
sliced W on a mixture.  Planted bugs these thresholds were checked to catch (var ratio / mean
error on the 64-D law, VP and VE): the improved-Euler noise coefficient x1.1 (1.20 / 1.22), the score
coefficients x1.1 (0.78 / 0.80), the second stage's score taken at t instead of t - h (1.08 / 1.08,
mean off by 0.018); a ring radius 10% too large doubles the mixture's sliced W (0.12 vs 0.05).

The algorithm's own bias: in very low dimension the accept/reject selects noise draws (a 1-D
Gaussian's variance comes out ~1.7x too large at rtol = 1e-2 for VP, in the authors' algorithm
reimplemented in plain PyTorch as well); it fades with dimension (16-D: a few %, 64-D: ~2%).
The tests use the dimensions the method is meant for.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

import scorefast as sf
from scorefast import graphs
from scorefast.errors import NonFiniteError
from scorefast.rng import STREAM_SAMPLER, randn
from scorefast.sde import VESDE, VPSDE
from scorefast.solvers import SolverError
from scorefast.testing import sliced_wasserstein
from tests.test_samplers import C, M, linear_score

SDES = [VPSDE(), VESDE(0.01, 10)]
IDS = ["VP", "VE"]


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_gaussian_law_in_64_dimensions(sde):
    """Gaussian data N(M, C) per dimension, exact score: the output at eps (no denoising) has the
    marginal N(a M, a^2 C + s^2) within the algorithm's ~2% bias and the Monte-Carlo error."""
    x = sf.sample(linear_score(sde), sde, (1000, 64), sampler="adaptive_sde", seed=1, denoise=False)
    e = torch.tensor([sde.eps], dtype=torch.float64)
    a, s = sde.mean_coef(e).item(), sde.std(e).item()
    assert abs(x.double().mean().item() - a * M) < 0.01
    ratio = x.double().var(0).mean().item() / (a * a * C + s * s)
    assert 0.96 < ratio < 1.05, ratio


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_mixture_in_8_dimensions_within_the_monte_carlo_floor(sde):
    gm = sf.testing.GaussianMixture.ring(6, 3.0, 0.5, dim=8)
    N = 2000
    exact = gm.sample(N, seed=11).float()
    floor = sum(sliced_wasserstein(gm.sample(N, seed=20 + k).float(), exact, n_proj=256) for k in range(2)) / 2
    x, info = sf.sample(gm.score_fn(sde), sde, (N, 8), sampler="adaptive_sde", rtol=2e-2, atol=2e-2, return_info=True)
    limit = 1.5 * floor
    assert sliced_wasserstein(x, exact, n_proj=256) < limit
    wide = x.clone()
    wide[:, :2] *= 1.1  # a ring 10% too wide: the threshold is sharp enough to see it
    assert sliced_wasserstein(wide, exact, n_proj=256) > limit
    nfe = info["nfe_per_sample"]
    assert info["nfe"] == int(nfe.max()) and nfe.min() < nfe.max() and (nfe % 2 == 1).all()  # 2 per attempt + 1


def elementwise(x, t, **_):  # a batch-invariant score
    return -x / (1.0 + t[:, None] ** 2) - 0.3 * torch.sin(3 * x)


def test_batch_invariance_bitwise_for_1_7_and_1000_samples():
    sde = VPSDE()
    kw = dict(sampler="adaptive_sde", seed=3, return_info=True)
    big, info = sf.sample(elementwise, sde, (1000, 5), **kw)
    for ids in ([777], [5, 999, 0, 777, 3, 64, 500]):
        small, small_info = sf.sample(elementwise, sde, (len(ids), 5), sample_ids=torch.tensor(ids), **kw)
        assert torch.equal(small, big[ids])
        assert torch.equal(small_info["nfe_per_sample"], info["nfe_per_sample"][ids])
    assert info["nfe_per_sample"].min() < info["nfe_per_sample"].max()


def _authors_loop(score, sde, x, seed, *, rtol, atol, h_init, safety=0.9, exponent=0.9):
    """The authors' PyTorch sampler (AlexiaJM/score_sde_fast_sampling, sde_sampling_torch.py,
    ``AdaptivePredictor.update_fn`` and ``pc_sampler_adaptive``) transcribed in float64, with our
    draws (attempt n: Philox step n of the sampler stream) and our h_init (a fraction of the span).
    Returns (x at eps before denoising, attempts per sample)."""
    B = x.shape[0]
    t_end = float(sde.eps)
    t = torch.full((B,), float(sde.T), dtype=torch.float64)
    h = torch.full((B,), h_init * (float(sde.T) - t_end), dtype=torch.float64)
    x_prev, attempts, n = x, torch.zeros(B, dtype=torch.int64), 0
    while bool(((t - t_end).abs() > 1e-6).any()):  # the authors' end test
        attempts += (t - t_end).abs() > 1e-6
        z = randn(x.shape, seed=seed, step=n, stream=STREAM_SAMPLER, sample_ids=torch.arange(B), dtype=x.dtype)
        f, g = sde.sde(x, t)
        K1 = -h[:, None] * (f - g[:, None] ** 2 * score(x, t)) + g[:, None] * h.sqrt()[:, None] * z
        f2, g2 = sde.sde(x + K1, t - h)
        K2 = -h[:, None] * (f2 - g2[:, None] ** 2 * score(x + K1, t - h)) + g2[:, None] * h.sqrt()[:, None] * z
        E = (K2 - K1) / 2  # improved Euler minus Euler-Maruyama, noise included
        x_new, x_check = x + (K1 + K2) / 2, x + K1  # extrapolation: keep the improved-Euler value
        err_ctl = (torch.maximum(x_prev.abs(), x_check.abs()) * rtol).clamp_min(atol)
        norm = (E / err_ctl).pow(2).mean(1).sqrt()  # "L2_scaled"
        accept = norm <= 1
        x = torch.where(accept[:, None], x_new, x)
        x_prev = torch.where(accept[:, None], x_check, x_prev)
        t = torch.where(accept, t - h, t)
        h = torch.minimum((t - t_end).clamp_min(0), safety * h * norm.clamp_min(1e-10) ** -exponent)
        n += 1
    return x, attempts


@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize(
    "options", [dict(rtol=5e-2, atol=5e-2), dict(rtol=0.3, atol=0.05, exponent=0.5, safety=0.8, h_init=0.1)]
)
def test_matches_the_authors_loop_attempt_by_attempt(sde, options):
    """Same draws, float64: the same samples at eps and the same attempts per sample as the authors'
    code (error scale max(|x'|, |x'_prev|), improved-Euler noise, L2-scaled norm, step rule).  Planted
    deviations this catches: x'_prev not updated on accept, the Euler-Maruyama noise g(t) in the
    improved-Euler value, the exponent off by 0.1, the error norm off by 10%."""
    defaults = dict(rtol=1e-2, atol=1e-2, h_init=1e-2)
    B, seed = 16, 7
    x, info = sf.sample(
        elementwise,
        sde,
        (B, 8),
        sampler="adaptive_sde",
        seed=seed,
        dtype=torch.float64,
        backend="torch",
        denoise=False,
        return_info=True,
        **options,
    )
    x_T = sde.prior_sampling((B, 8), seed=seed, dtype=torch.float64, backend="torch")
    ref, attempts = _authors_loop(elementwise, sde, x_T, seed, **{**defaults, **options})
    assert torch.equal(info["nfe_per_sample"], 2 * attempts)
    torch.testing.assert_close(x, ref, rtol=1e-6, atol=1e-8)  # ~200 attempts of float64 rounding


def test_noise_is_one_draw_per_attempt_on_stream_zero(monkeypatch):
    """Attempt n draws Philox step k = n (S = 1) and both passes use that same z."""
    seen = []
    cpu = importlib.import_module("scorefast.backends.cpu_backend")
    original = cpu.fused_update

    def spy(out, x, terms, coefs, ids, seed, step, stream, with_noise, **kw):  # every noisy kernel launch
        if with_noise:
            seen.append((stream, int(step)))
        return original(out, x, terms, coefs, ids, seed, step, stream, with_noise, **kw)

    monkeypatch.setattr(cpu, "fused_update", spy)
    _, info = sf.sample(elementwise, VPSDE(), (3, 2), sampler="adaptive_sde", return_info=True)
    attempts = (info["nfe"] - 1) // 2
    assert sorted(seen) == sorted([(STREAM_SAMPLER, k) for k in range(attempts)] * 2)


@pytest.mark.parametrize("options", [{}, dict(brownian="bridge", rtol=0.05, atol=0.05)], ids=["redraw", "bridge"])
def test_a_captured_attempt_replays_as_eager(options):
    sde = VPSDE()
    kw = dict(sampler="adaptive_sde", seed=4, return_info=True, **options)
    a, ia = sf.sample(elementwise, sde, (12, 3), **kw)
    assert ia["nfe_per_sample"].min() < ia["nfe_per_sample"].max()
    with warnings.catch_warnings(), graphs.emulated():
        warnings.simplefilter("error")
        b, ib = sf.sample(elementwise, sde, (12, 3), cuda_graph=True, **kw)
    assert ib["graphed"] and torch.equal(a, b)
    assert torch.equal(ia["nfe_per_sample"], ib["nfe_per_sample"])


@pytest.mark.parametrize("brownian", ["redraw", "bridge"])
@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graphed"])
def test_a_nan_score_raises_at_the_first_bad_attempt(graphed, brownian):
    def bad(x, t):
        return torch.where((t < 0.6)[:, None], torch.full_like(x, float("nan")), -x)

    pattern = r"adaptive_sde: non-finite values at step \d+ \(the attempt from t = 0\.[6-9]"
    with warnings.catch_warnings(), graphs.emulated(), pytest.raises(NonFiniteError, match=pattern):
        warnings.simplefilter("error")
        sf.sample(bad, VPSDE(), (4, 2), sampler="adaptive_sde", cuda_graph=graphed, brownian=brownian)


@pytest.mark.parametrize(
    "options,exc,name",
    [
        (dict(rtol=0.0), ValueError, "rtol"),
        (dict(atol=float("nan")), ValueError, "atol"),
        (dict(h_init=2.0), ValueError, "h_init"),
        (dict(safety=0.0), ValueError, "safety"),
        (dict(exponent=-1.0), ValueError, "exponent"),
        (dict(error_norm="max"), ValueError, "error_norm"),
        (dict(max_steps=0), ValueError, "max_steps"),
        (dict(max_steps=2), SolverError, "max_steps"),
        (dict(steps_each=3), TypeError, "steps_each"),
    ],
)
def test_bad_options_name_the_argument(options, exc, name):
    with pytest.raises(exc, match=name):
        sf.sample(elementwise, VPSDE(), (2, 2), sampler="adaptive_sde", **options)


def test_batch_error_norm_takes_one_step_sequence():
    _, info = sf.sample(elementwise, VPSDE(), (6, 2), sampler="adaptive_sde", error_norm="batch", return_info=True)
    assert (info["nfe_per_sample"] == info["nfe"]).all()


def test_conditional_wrappers_are_refused():
    """A conditional projection runs after every grid step; adaptive attempts have none."""
    with pytest.raises(ValueError, match="sampler"):
        sf.conditional.inpaint(elementwise, VPSDE(), torch.zeros(2, 2), torch.ones(2, 2), sampler="adaptive_sde")


# -- brownian="bridge": rejection sampling with memory (scorefast.solvers.brownian_memory) -----------


def _gaussian_2d_variance_ratio(sde, tol, brownian, n=6000, seed=2):
    """Var of 2-D Gaussian samples N(0, 0.35^2 I) at eps (no denoising) over the exact marginal's."""
    gm = sf.testing.GaussianMixture([1.0], [[0.0, 0.0]], 0.35**2)
    x = sf.sample(gm.score_fn(sde), sde, (n, 2), sampler="adaptive_sde", seed=seed, rtol=tol, atol=tol,
                  brownian=brownian, denoise=False)  # fmt: skip
    e = torch.tensor([sde.eps], dtype=torch.float64)
    a, s = sde.mean_coef(e).item(), sde.std(e).item()
    return x.double().var(0).mean().item() / (a * a * 0.35**2 + s * s)


@pytest.mark.parametrize("sde", [VESDE(), VPSDE()], ids=IDS)
def test_bridge_converges_in_law_where_redrawing_does_not(sde):
    """In 2-D the authors' accept/reject selects the noise draws and the variance comes out too large,
    more so as the tolerance tightens (VE: 1.2x / 1.75x / 2.3x at 0.3 / 0.05 / 0.01).  With the kept
    increments the law converges: 0.96x-0.97x at 2e-2 (the rest is the step's own error; the estimate's
    sd over 12000 numbers is 1.3%), within a 7% band that the redrawing loop misses by far (VE 2.1x,
    VP 1.27x)."""
    ratio = _gaussian_2d_variance_ratio(sde, 2e-2, "bridge")
    assert 0.93 < ratio < 1.07, ratio
    biased = _gaussian_2d_variance_ratio(sde, 2e-2, "redraw")
    assert not 0.93 < biased < 1.07, biased  # the band is sharp enough to see the authors' bias


def _loop_with_memory(score, sde, x, seed, *, rtol, atol, h_init, safety=0.9, exponent=0.9):
    """``_authors_loop`` with rejection sampling with memory (Rackauckas & Nie 2017, RSwM1), written
    per sample with Python lists as stacks: attempt n draws z at Philox step 2n; a sample with kept
    intervals takes its last one (step and increment) instead; a rejected attempt's increment
    W = sqrt(h) z is split at the next step h' by the Brownian bridge (xi at step 2n + 1) and both
    pieces are kept, the first on top."""
    B = x.shape[0]
    t_end = float(sde.eps)
    t = torch.full((B,), float(sde.T), dtype=torch.float64)
    h = torch.full((B,), h_init * (float(sde.T) - t_end), dtype=torch.float64)
    x_prev, attempts, n = x, torch.zeros(B, dtype=torch.int64), 0
    stacks: list[list] = [[] for _ in range(B)]
    draw = dict(seed=seed, stream=STREAM_SAMPLER, sample_ids=torch.arange(B), dtype=x.dtype, backend="torch")
    while bool(((t - t_end).abs() > 1e-6).any()):
        active = (t - t_end).abs() > 1e-6
        attempts += active
        z = randn(x.shape, step=2 * n, **draw)
        xi = randn(x.shape, step=2 * n + 1, **draw)
        for i in range(B):
            if stacks[i]:
                dt, w = stacks[i].pop()
                h[i], z[i] = min(dt, float(t[i] - t_end)), w / dt**0.5
        f, g = sde.sde(x, t)
        K1 = -h[:, None] * (f - g[:, None] ** 2 * score(x, t)) + g[:, None] * h.sqrt()[:, None] * z
        f2, g2 = sde.sde(x + K1, t - h)
        K2 = -h[:, None] * (f2 - g2[:, None] ** 2 * score(x + K1, t - h)) + g2[:, None] * h.sqrt()[:, None] * z
        E = (K2 - K1) / 2
        x_new, x_check = x + (K1 + K2) / 2, x + K1
        err_ctl = (torch.maximum(x_prev.abs(), x_check.abs()) * rtol).clamp_min(atol)
        norm = (E / err_ctl).pow(2).mean(1).sqrt()
        accept = norm <= 1
        x = torch.where(accept[:, None], x_new, x)
        x_prev = torch.where(accept[:, None], x_check, x_prev)
        t = torch.where(accept, t - h, t)
        h_next = torch.minimum((t - t_end).clamp_min(0), safety * h * norm.clamp_min(1e-10) ** -exponent)
        for i in torch.nonzero(active & ~accept).flatten().tolist():
            q = float(h_next[i] / h[i])
            w = z[i] * float(h[i]) ** 0.5
            first = q * w + (q * (1 - q) * float(h[i])) ** 0.5 * xi[i]
            stacks[i] += [(float(h[i] - h_next[i]), w - first), (float(h_next[i]), first)]
        h = h_next
        n += 1
    return x, attempts


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_bridge_matches_a_per_sample_transcription_attempt_by_attempt(sde):
    """Same draws, float64: the same samples at eps and the same attempts per sample as the plain
    per-sample loop above.  Planted deviations this catches: the bridge's noise term dropped, the
    kept pieces pushed in the wrong order, the kept step not replacing the controller's."""
    B, seed, options = 16, 7, dict(rtol=0.2, atol=0.2, h_init=1e-2)  # VE: ~300 attempts, before float64
    # rounding differences (its error estimate is a small difference) grow into a different decision
    x, info = sf.sample(elementwise, sde, (B, 8), sampler="adaptive_sde", seed=seed, dtype=torch.float64,
                        backend="torch", denoise=False, return_info=True, brownian="bridge", **options)  # fmt: skip
    x_T = sde.prior_sampling((B, 8), seed=seed, dtype=torch.float64, backend="torch")
    ref, attempts = _loop_with_memory(elementwise, sde, x_T, seed, **options)
    assert info["draws_per_step"] == 2
    assert torch.equal(info["nfe_per_sample"], 2 * attempts)
    torch.testing.assert_close(x, ref, rtol=1e-6, atol=1e-8)


def test_the_bridge_splits_an_increment_into_independent_pieces():
    """brownian_memory.keep: the two kept pieces of W ~ N(0, h) split at h' sum to W and are independent
    N(0, h') and N(0, h - h') (moments over 200000 draws, 5 sd bands); a sample not rejected keeps
    nothing; the top is the first piece and ``take`` pops it as standard-normal noise."""
    from scorefast.solvers import brownian_memory as bm

    B, D, depth = 4, 50000, 2
    g = torch.Generator().manual_seed(0)
    z, xi = torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(B, D, generator=g, dtype=torch.float64)
    h = torch.tensor([0.5, 0.5, 2.0, 1.0], dtype=torch.float64)
    h_next = torch.tensor([0.1, 0.4, 0.5, 1.0], dtype=torch.float64)
    dts, incs, height, overflow = bm.start(B, D, depth, torch.float64, "cpu")
    rejected = torch.tensor([True, True, True, False])
    bm.keep(rejected, h, h_next, z, xi, dts, incs, height, overflow)
    assert height.tolist() == [2, 2, 2, 0] and int(overflow) == 0
    torch.testing.assert_close(dts[:2, :3].sum(0), h[:3], rtol=0, atol=1e-15)
    torch.testing.assert_close(incs[:2, :3].sum(0), z[:3] * h[:3, None].sqrt(), rtol=0, atol=1e-12)
    for i in range(3):
        first, rest = incs[1, i], incs[0, i]
        assert dts[1, i] == h_next[i] and dts[0, i] == h[i] - h_next[i]
        for piece, var in ((first, float(h_next[i])), (rest, float(h[i] - h_next[i]))):
            assert abs(piece.var().item() / var - 1) < 5 * (2 / D) ** 0.5
        assert abs((first * rest).mean().item()) / (float(h_next[i] * (h[i] - h_next[i])) ** 0.5) < 5 / D**0.5
    step, noise = bm.take(h_next, torch.full((B,), 9.0, dtype=torch.float64), xi, dts, incs, height)
    assert height.tolist() == [1, 1, 1, 0]
    torch.testing.assert_close(step, h_next)
    torch.testing.assert_close(noise[:3], incs[1, :3] / h_next[:3, None].sqrt())
    assert torch.equal(noise[3], xi[3])
    bm.keep(rejected, h, h_next, z, xi, dts, incs, height, overflow)  # depth 2: no room for two more
    assert height.tolist() == [0, 0, 0, 0] and int(overflow) == 3  # those drop their kept intervals: fresh draws next


def test_bridge_batch_invariance_bitwise():
    kw = dict(sampler="adaptive_sde", seed=3, return_info=True, brownian="bridge", rtol=0.05, atol=0.05)
    big, info = sf.sample(elementwise, VPSDE(), (1000, 5), **kw)
    ids = [5, 999, 0, 777, 3, 64, 500]
    small, small_info = sf.sample(elementwise, VPSDE(), (len(ids), 5), sample_ids=torch.tensor(ids), **kw)
    assert torch.equal(small, big[ids])
    assert torch.equal(small_info["nfe_per_sample"], info["nfe_per_sample"][ids])
    assert info["nfe_per_sample"].min() < info["nfe_per_sample"].max()


def test_bridge_draws_two_counters_per_attempt(monkeypatch):
    """Attempt n draws z at Philox step 2n and the bridge point at 2n + 1, stream 0; no fused pass
    draws noise of its own."""
    module = importlib.import_module("scorefast.samplers.adaptive_sde")
    seen, original = [], module.noise_op

    def spy(ids, seed, step, numel, stream, offset, kind, *args):
        seen.append((stream, int(step)))
        return original(ids, seed, step, numel, stream, offset, kind, *args)

    monkeypatch.setattr(module, "noise_op", spy)
    _, info = sf.sample(elementwise, VPSDE(), (3, 2), sampler="adaptive_sde", return_info=True, brownian="bridge")
    attempts = (info["nfe"] - 1) // 2
    assert sorted(seen) == [(STREAM_SAMPLER, k) for k in range(2 * attempts)]


def test_a_full_stack_warns_and_redraws():
    with pytest.warns(RuntimeWarning, match="bridge_depth"):
        x = sf.sample(elementwise, VPSDE(), (16, 2), sampler="adaptive_sde", rtol=5e-2, atol=5e-2,
                      brownian="bridge", bridge_depth=2)  # fmt: skip
    assert torch.isfinite(x).all()


@pytest.mark.parametrize(
    "options,exc",
    [(dict(brownian="memory"), ValueError), (dict(bridge_depth=1), ValueError), (dict(bridge_depth=4.0), TypeError)],
)
def test_bad_bridge_options_name_the_argument(options, exc):
    with pytest.raises(exc, match=next(iter(options))):
        sf.sample(elementwise, VPSDE(), (2, 2), sampler="adaptive_sde", **{"brownian": "bridge", **options})
