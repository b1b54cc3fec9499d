"""scorefast.compat.k_diffusion against the real k-diffusion: same model, same noise.

Accuracy rule (flash-attention's): our fp32 result's error against k-diffusion run in float64 is at
most 2x k-diffusion's own fp32 error (plus a few ulps of the result's scale).
"""

from __future__ import annotations

import contextlib
import inspect
import math

import pytest
import torch

import scorefast as sf
from scorefast.compat import k_diffusion as ours
from scorefast.sde import EDM
from tests.peers import k_diffusion_sampling

GM = sf.testing.GaussianMixture.ring(5, 2.0, 0.4, dim=3)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tensors here are tiny: one thread (a parallel region on a loaded machine costs milliseconds)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


SDE = EDM()
B, N = 7, 12


def denoiser(x, sigma):
    """The mixture's exact D(x, sigma) = x + sigma^2 score (nonlinear in x)."""
    s = GM.score(x.double(), sigma.double(), SDE)
    return (x.double() + sigma.double()[:, None] ** 2 * s).to(x.dtype)


def _noises(dtype):
    g = torch.Generator().manual_seed(5)
    return [
        torch.randn(B, 3, generator=g, dtype=torch.float64).to(dtype) for _ in range(2 * N + 2)
    ]  # dpmpp_sde: 2 a step


class _Sampler:
    """noise_sampler(sigma, sigma_next) returning the i-th fixed noise, i found from sigma."""

    def __init__(self, sigmas, noises):
        self.sigmas, self.noises = sigmas.double().tolist(), noises

    def __call__(self, sigma, sigma_next):
        return self.noises[self.sigmas.index(float(sigma))].clone()


class _Ordered:
    """noise_sampler returning the fixed noises in call order (samplers whose sub-step sigmas are
    not in the schedule; k-diffusion and ours call it in the same order when eta > 0)."""

    def __init__(self, sigmas, noises):
        self.noises = iter(noises)

    def __call__(self, sigma, sigma_next):
        return next(self.noises).clone()


ORDERED = {"sample_dpmpp_sde"}


CASES = [
    ("sample_euler", {}),
    ("sample_euler", {"s_churn": 2.0, "s_noise": 1.003}),
    ("sample_euler_ancestral", {"eta": 0.8}),
    ("sample_heun", {}),
    ("sample_heun", {"s_churn": 1.0}),
    ("sample_dpm_2", {}),
    ("sample_dpm_2", {"s_churn": 1.0}),
    ("sample_lms", {}),
    ("sample_dpmpp_2m", {}),
    ("sample_dpmpp_2m_sde", {}),
    ("sample_dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.5}),
    ("sample_dpmpp_3m_sde", {}),
    ("sample_dpm_2_ancestral", {}),
    ("sample_dpm_2_ancestral", {"eta": 0.6, "s_noise": 1.01}),
    ("sample_dpmpp_2s_ancestral", {}),
    ("sample_dpmpp_2s_ancestral", {"eta": 0.7, "s_noise": 0.98}),
    ("sample_dpmpp_sde", {}),
    ("sample_dpmpp_sde", {"eta": 0.5, "s_noise": 1.02, "r": 0.3}),
    ("sample_dpmpp_sde", {"eta": 0.0, "r": 0.7}),
]


def _run(fn, x, sigmas, noises, options, monkeypatch, *, churn_patch):
    """Run fn with its churn randn_like patched (k-diffusion) or a noise sampler (ours)."""
    kw = dict(options)
    uses_sampler = "noise_sampler" in inspect.signature(fn).parameters
    if churn_patch:  # k-diffusion's churn samplers draw torch.randn_like once per step
        it = iter(noises)
        monkeypatch.setattr(torch, "randn_like", lambda t, **_: next(it).clone())
    if uses_sampler and (not churn_patch or "ancestral" in fn.__name__ or "sde" in fn.__name__):
        kw["noise_sampler"] = (_Ordered if fn.__name__ in ORDERED else _Sampler)(sigmas, noises)
    try:
        return fn(denoiser, x.clone(), sigmas, disable=True, **kw)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{'-'.join(o) or 'plain'}" for n, o in CASES])
def test_matches_k_diffusion(name, options, monkeypatch):
    kd = k_diffusion_sampling()
    sig32 = kd.get_sigmas_karras(N, 0.002, 80.0)
    torch.testing.assert_close(ours.get_sigmas_karras(N, 0.002, 80.0), sig32, rtol=0, atol=0)
    x0 = torch.randn(B, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80
    ref = _run(getattr(kd, name), x0, sig32.double(), _noises(torch.float64), options, monkeypatch, churn_patch=True)
    theirs = _run(getattr(kd, name), x0.float(), sig32, _noises(torch.float32), options, monkeypatch, churn_patch=True)
    got = _run(getattr(ours, name), x0.float(), sig32, _noises(torch.float32), options, monkeypatch, churn_patch=False)
    their_err = (theirs.double() - ref).abs().max().item()
    our_err = (got.double() - ref).abs().max().item()
    assert our_err <= 2 * their_err + 8 * torch.finfo(torch.float32).eps * ref.abs().max().item(), (our_err, their_err)


def test_schedules_and_helpers_match():
    kd = k_diffusion_sampling()
    for fn, args in (("get_sigmas_exponential", (9, 0.01, 50.0)), ("get_sigmas_polyexponential", (9, 0.01, 50.0, 2.0))):
        torch.testing.assert_close(getattr(ours, fn)(*args), getattr(kd, fn)(*args), rtol=0, atol=0)
    x, d = torch.randn(4, 3), torch.randn(4, 3)
    sigma = torch.tensor(1.7)
    torch.testing.assert_close(ours.to_d(x, sigma, d), kd.to_d(x, sigma, d))
    assert ours.get_ancestral_step(2.0, 1.0, 0.7) == pytest.approx(kd.get_ancestral_step(2.0, 1.0, 0.7))


def test_callback_dicts_match():
    kd = k_diffusion_sampling()
    sig = kd.get_sigmas_karras(4, 0.01, 10.0)
    x0 = torch.randn(B, 3) * 10
    seen = {"ours": [], "theirs": []}
    ours.sample_heun(denoiser, x0, sig, disable=True, callback=lambda d: seen["ours"].append(d))
    kd.sample_heun(denoiser, x0, sig, disable=True, callback=lambda d: seen["theirs"].append(d))
    assert [sorted(d) for d in seen["ours"]] == [sorted(d) for d in seen["theirs"]]
    for a, b in zip(seen["ours"], seen["theirs"]):
        assert a["i"] == b["i"] and float(a["sigma"]) == float(b["sigma"])
        torch.testing.assert_close(a["denoised"], b["denoised"], rtol=1e-5, atol=1e-4)


def test_default_noise_is_the_philox_stream_seeded_by_torch_manual_seed():
    sig = ours.get_sigmas_karras(6, 0.01, 10.0)
    x0 = torch.randn(5, 3) * 10
    torch.manual_seed(3)
    a = ours.sample_euler_ancestral(denoiser, x0, sig, disable=True)
    torch.manual_seed(3)
    b = ours.sample_euler_ancestral(denoiser, x0, sig, disable=True)
    torch.manual_seed(3)
    seed = sf.rng.philox_seed()
    philox = lambda s, sn: sf.randn((5, 3), seed=seed, step=sig.tolist().index(float(s)), stream=0)  # noqa: E731
    c = ours.sample_euler_ancestral(denoiser, x0, sig, disable=True, noise_sampler=philox)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-5)
    torch.manual_seed(3)  # sample b's noise does not depend on the batch
    first3 = ours.sample_euler_ancestral(denoiser, x0[:3], sig, disable=True)
    assert torch.equal(first3, a[:3])


def test_bad_input():
    with pytest.raises(ValueError, match="sigmas"):
        ours.sample_euler(denoiser, torch.randn(2, 3), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="sigmas"):
        ours.sample_euler(denoiser, torch.randn(2, 3), torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="model"):
        ours.sample_euler(None, torch.randn(2, 3), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="solver_type"):
        ours.sample_dpmpp_2m_sde(denoiser, torch.randn(2, 3), torch.tensor([1.0, 0.0]), solver_type="rk")


# -- samplers on (sigma_min, sigma_max): DPM-Solver-fast and adaptive ---------------------------
X0 = torch.randn(B, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80


@contextlib.contextmanager
def _default_dtype(dtype):
    """k-diffusion's DPMSolver builds its times with torch.tensor(sigma): float64 only under this."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _err_rule(ours_fp32, theirs_fp32, ref64):
    their_err = (theirs_fp32.double() - ref64).abs().max().item()
    our_err = (ours_fp32.double() - ref64).abs().max().item()
    assert our_err <= 2 * their_err + 8 * torch.finfo(torch.float32).eps * ref64.abs().max().item(), (
        our_err,
        their_err,
    )


@pytest.mark.parametrize(
    "n,options",
    [
        (1, {}),
        (2, {}),
        (3, {}),
        (5, {}),
        (6, {"eta": 0.7, "s_noise": 1.01}),
        (10, {}),
        (11, {"eta": 0.4}),
    ],
)
def test_dpm_fast_matches_k_diffusion(n, options):
    kd = k_diffusion_sampling()

    def run(fn, dtype):
        noise = _Ordered(None, _noises(dtype))
        return fn(denoiser, X0.to(dtype), 0.002, 80.0, n, disable=True, noise_sampler=noise, **options)

    with _default_dtype(torch.float64):
        ref = run(kd.sample_dpm_fast, torch.float64)
    _err_rule(run(ours.sample_dpm_fast, torch.float32), run(kd.sample_dpm_fast, torch.float32), ref)


def test_dpm_fast_reverse_and_callback():
    """sigma_min > sigma_max integrates towards more noise (eta = 0); the callback keys are k-diffusion's."""
    kd = k_diffusion_sampling()
    x = X0[:, :] / 80
    seen = {"ours": [], "theirs": []}
    with _default_dtype(torch.float64):
        ref = kd.sample_dpm_fast(denoiser, x.clone(), 5.0, 0.05, 7, disable=True, callback=seen["theirs"].append)
    theirs = kd.sample_dpm_fast(denoiser, x.float(), 5.0, 0.05, 7, disable=True)
    got = ours.sample_dpm_fast(denoiser, x.float(), 5.0, 0.05, 7, disable=True, callback=seen["ours"].append)
    _err_rule(got, theirs, ref)
    assert [sorted(d) for d in seen["ours"]] == [sorted(d) for d in seen["theirs"]]
    for a, b in zip(seen["ours"], seen["theirs"]):
        assert a["i"] == b["i"] and float(a["sigma"]) == pytest.approx(float(b["sigma"]), rel=1e-12)


def _smooth_noise(rows):
    """A deterministic, smooth-in-sigma noise_sampler (row b of it for sample b): float64 and fp32
    runs that query slightly different sigmas get nearly the same values."""

    def sampler(sigma, sigma_next):
        e = torch.arange(3, dtype=torch.float64)
        u = 3 * math.log(float(sigma)) + 5 * math.log(float(sigma_next))
        return torch.stack([1.4 * torch.sin(1.3 * b + 2.1 * e + u) for b in rows])

    return sampler


ADAPTIVE = [
    {"order": 3},
    {"order": 2},
    {"order": 3, "eta": 0.6, "s_noise": 0.9},
    {"order": 2, "eta": 0.3},
    {"order": 3, "rtol": 1e-3, "atol": 1e-4, "h_init": 0.2, "pcoeff": 0.1, "icoeff": 0.6, "dcoeff": 0.05},
    {"order": 2, "accept_safety": 0.95, "h_init": 0.5},
]


@pytest.mark.parametrize("options", ADAPTIVE, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_dpm_adaptive_is_k_diffusion_per_sample(options):
    """float64 both sides: our batch of 7 equals k-diffusion run on each sample alone (B = 1), step
    for step: the same accepted/rejected attempts, the same result (per-sample error control)."""
    kd = k_diffusion_sampling()
    with _default_dtype(torch.float64):
        refs = [
            kd.sample_dpm_adaptive(
                denoiser,
                X0[b : b + 1].clone(),
                0.002,
                80.0,
                disable=True,
                return_info=True,
                noise_sampler=_smooth_noise([b]),
                **options,
            )
            for b in range(B)
        ]
        got, info = ours.sample_dpm_adaptive(
            denoiser,
            X0.clone(),
            0.002,
            80.0,
            disable=True,
            return_info=True,
            noise_sampler=_smooth_noise(range(B)),
            **options,
        )
    torch.testing.assert_close(got, torch.cat([r[0] for r in refs]), rtol=1e-7, atol=1e-8)
    for key in ("steps", "nfe", "n_accept", "n_reject"):
        assert info[f"{key}_per_sample"].tolist() == [r[1][key] for r in refs], key
        assert info[key] == max(r[1][key] for r in refs)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_dpm_adaptive_fp32_matches_k_diffusion(order, eta):
    """fp32 arithmetic against k-diffusion's own fp32 error, on fixed steps (pcoeff = icoeff = dcoeff
    = 0 accepts every attempt): in fp32 the first errors are rounding, so a PID step sequence
    depends on rounding, in k-diffusion as here; the float64 test above pins the controller."""
    kd = k_diffusion_sampling()
    kw = {"order": order, "eta": eta, "h_init": 0.8, "pcoeff": 0.0, "icoeff": 0.0, "dcoeff": 0.0}
    with _default_dtype(torch.float64):
        ref = kd.sample_dpm_adaptive(
            denoiser, X0.clone(), 0.002, 80.0, disable=True, noise_sampler=_smooth_noise(range(B)), **kw
        )
    theirs = kd.sample_dpm_adaptive(
        denoiser, X0.float(), 0.002, 80.0, disable=True, noise_sampler=_smooth_noise(range(B)), **kw
    )
    got, info = ours.sample_dpm_adaptive(
        denoiser, X0.float(), 0.002, 80.0, disable=True, noise_sampler=_smooth_noise(range(B)), return_info=True, **kw
    )
    _err_rule(got, theirs, ref)
    assert info["n_reject"] == 0 and info["steps"] == math.ceil((math.log(80.0) - math.log(0.002)) / 0.8)


def _elementwise(x, sigma, shift=None, scale=None):
    """A nonlinear denoiser that is element-wise (so batch-invariant bitwise); shift: per sample
    [B, ...] (rows follow the samples), scale: broadcast [1, ...]."""
    if shift is not None:
        assert shift.shape[0] == x.shape[0] and scale.shape[0] == 1
        x = x * scale + shift
    s = sigma.reshape(-1, *[1] * (x.dim() - 1))
    return x / (1 + s**2) + 0.5 * torch.tanh(x) * s / (1 + s**2)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_dpm_adaptive_is_batch_invariant(eta):
    """Per-sample step sizes, finished samples leave the batch: a sample's result does not depend on
    its batch, bitwise (Philox noise; extra_args rows follow their samples)."""
    x = torch.randn(9, 4, 5, generator=torch.Generator().manual_seed(3)) * 20
    shift = torch.randn(9, 4, 5, generator=torch.Generator().manual_seed(4)) * 0.1
    scale = torch.full((1, 4, 5), 1.01)
    kw = {"eta": eta, "rtol": 0.01, "disable": True, "return_info": True}
    torch.manual_seed(11)
    full, info = ours.sample_dpm_adaptive(
        _elementwise, x, 0.01, 20.0, extra_args={"shift": shift, "scale": scale}, **kw
    )
    assert len(set(info["steps_per_sample"].tolist())) > 1  # samples finished at different attempts
    for rows in ([4], [0, 1, 2], [6, 7, 8], list(range(6))):
        # sample ids are arange(B) of each call: with noise, compare prefixes of the batch only
        if eta and rows[0] != 0:
            continue
        torch.manual_seed(11)
        part, part_info = ours.sample_dpm_adaptive(
            _elementwise, x[rows], 0.01, 20.0, extra_args={"shift": shift[rows], "scale": scale}, **kw
        )
        assert torch.equal(part, full[rows])
        assert part_info["steps_per_sample"].tolist() == info["steps_per_sample"][rows].tolist()


def test_dpm_adaptive_noise_is_the_philox_stream():
    """eta > 0 without a noise_sampler: sample b's noise at attempt n is Philox (seed, k = n, id = b),
    the seed drawn from torch.manual_seed's generator, also after finished samples left the batch."""
    x = torch.randn(9, 4, 5, generator=torch.Generator().manual_seed(3)) * 20
    kw = {"eta": 0.5, "rtol": 0.01, "disable": True, "return_info": True}
    torch.manual_seed(4)
    a, info = ours.sample_dpm_adaptive(_elementwise, x, 0.01, 20.0, **kw)
    assert len(set(info["steps_per_sample"].tolist())) > 1  # samples left the batch at different attempts
    torch.manual_seed(4)
    seed = sf.rng.philox_seed()
    attempt = [0]

    def philox(sigma, sigma_next):  # the whole batch's draw of this attempt; rows are taken by sample id
        return sf.randn(x.shape, seed=seed, step=attempt[0], stream=0)

    def count(info):
        attempt[0] = info["i"] + 1

    b, _ = ours.sample_dpm_adaptive(_elementwise, x, 0.01, 20.0, noise_sampler=philox, callback=count, **kw)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.manual_seed(5)
    assert not torch.allclose(ours.sample_dpm_adaptive(_elementwise, x, 0.01, 20.0, **kw)[0], a, atol=1e-3)


def test_dpm_adaptive_callback_and_info_keys():
    kd = k_diffusion_sampling()
    seen = {"ours": [], "theirs": []}
    x = X0[:1].float()
    _, their_info = kd.sample_dpm_adaptive(
        denoiser, x, 0.01, 80.0, disable=True, return_info=True, callback=seen["theirs"].append
    )
    _, info = ours.sample_dpm_adaptive(
        denoiser, x, 0.01, 80.0, disable=True, return_info=True, callback=seen["ours"].append
    )
    assert set(their_info) <= set(info)
    assert set(seen["theirs"][0]) <= set(seen["ours"][0])
    assert len(seen["ours"]) == info["steps"] and [d["i"] for d in seen["ours"]] == list(range(info["steps"]))


def test_dpm_adaptive_nan_raises():
    def broken(x, sigma):
        return torch.where(sigma[:, None] < 1.0, torch.full_like(x, float("nan")), x / (1 + sigma[:, None] ** 2))

    with pytest.raises(sf.NonFiniteError, match="dpm_adaptive"):
        ours.sample_dpm_adaptive(broken, X0.float(), 0.01, 80.0, disable=True)


# -- helpers --------------------------------------------------------------------------------------
def test_get_sigmas_vp_and_lms_coeff_match():
    kd = k_diffusion_sampling()
    torch.testing.assert_close(ours.get_sigmas_vp(9), kd.get_sigmas_vp(9), rtol=0, atol=0)
    torch.testing.assert_close(
        ours.get_sigmas_vp(5, 10.0, 0.2, 1e-2), kd.get_sigmas_vp(5, 10.0, 0.2, 1e-2), rtol=0, atol=0
    )
    t = kd.get_sigmas_karras(8, 0.1, 10.0).numpy()
    for order, i, j in ((1, 0, 0), (3, 4, 1), (4, 5, 3)):
        assert ours.linear_multistep_coeff(order, t, i, j) == pytest.approx(
            kd.linear_multistep_coeff(order, t, i, j), rel=1e-4
        )
    with pytest.raises(ValueError, match="order"):
        ours.linear_multistep_coeff(4, t, 1, 0)


def test_default_noise_sampler_is_k_diffusions():
    kd = k_diffusion_sampling()
    x = torch.zeros(3, 4)
    torch.manual_seed(2)
    a = ours.default_noise_sampler(x)(1.0, 0.5)
    torch.manual_seed(2)
    assert torch.equal(a, kd.default_noise_sampler(x)(1.0, 0.5))


@pytest.mark.parametrize("seed", [7, [3, 4, 5]])
def test_brownian_tree_noise_sampler_equals_k_diffusions(seed):
    kd = k_diffusion_sampling()
    x = torch.zeros(3, 2, 2)
    sigmas = kd.get_sigmas_karras(6, 0.05, 10.0)
    lo, hi = 0.04, 11.0  # queries inside the interval
    mine = ours.BrownianTreeNoiseSampler(x, lo, hi, seed=seed)
    theirs = kd.BrownianTreeNoiseSampler(x, lo, hi, seed=seed)
    for i in range(5):
        a, b = mine(sigmas[i], sigmas[i + 1]), theirs(sigmas[i], sigmas[i + 1])
        assert a.shape == x.shape and torch.equal(a, b)
    torch.manual_seed(9)  # seed=None draws from torch's generator, as k-diffusion's
    a = ours.BrownianTreeNoiseSampler(x, lo, hi)(sigmas[1], sigmas[2])
    torch.manual_seed(9)
    assert torch.equal(a, kd.BrownianTreeNoiseSampler(x, lo, hi)(sigmas[1], sigmas[2]))
    one = ours.BrownianTreeNoiseSampler(x, lo, hi, seed=torch.tensor(7))(sigmas[1], sigmas[2])  # a 0-d tensor seed
    assert torch.equal(one, ours.BrownianTreeNoiseSampler(x, lo, hi, seed=7)(sigmas[1], sigmas[2]))
    with pytest.raises(ValueError, match="seed"):
        ours.BrownianTreeNoiseSampler(x, 0.05, 10.0, seed=[1, 2])


@pytest.mark.filterwarnings("ignore:Should have t")  # k-diffusion: exp(-(-log sigma)) is not sigma in fp32
@pytest.mark.parametrize("name", ["sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"])
def test_k_diffusions_brownian_tree_as_noise_sampler(name):
    """k-diffusion's own default noise, passed to ours: the same result as k-diffusion's default run."""
    kd = k_diffusion_sampling()
    sig = kd.get_sigmas_karras(N, 0.002, 80.0)
    x = X0.float()
    tree = kd.BrownianTreeNoiseSampler(x, sig[-2], sig[0], seed=123)  # k-diffusion's own range
    theirs = getattr(kd, name)(denoiser, x, sig, disable=True, noise_sampler=tree)
    got = getattr(ours, name)(denoiser, x, sig, disable=True, noise_sampler=tree)
    torch.testing.assert_close(got, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "name,draws", [("sample_dpm_2_ancestral", 1), ("sample_dpmpp_2s_ancestral", 1), ("sample_dpmpp_sde", 2)]
)
def test_new_samplers_default_noise_is_philox(name, draws):
    """No noise_sampler: draw j of step i is Philox k = i * draws + j of one seed from torch.manual_seed."""
    sig = ours.get_sigmas_karras(6, 0.01, 10.0)
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(2)) * 10
    fn = getattr(ours, name)
    torch.manual_seed(3)
    a = fn(denoiser, x0, sig, disable=True)
    torch.manual_seed(3)
    seed = sf.rng.philox_seed()
    calls = iter(range(100))
    philox = lambda s, sn: sf.randn((5, 3), seed=seed, step=next(calls), stream=0)  # noqa: E731
    b = fn(denoiser, x0, sig, disable=True, noise_sampler=philox)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    assert next(calls) == draws * (len(sig) - 2)  # every step but the last into sigma = 0 draws
    torch.manual_seed(3)
    assert torch.equal(fn(denoiser, x0[:2], sig, disable=True), a[:2])


def test_signatures_are_k_diffusions():
    """Every k-diffusion sampler exists with its parameters, in order, with its defaults (ours may add
    noise_sampler at the end)."""
    kd = k_diffusion_sampling()
    names = [n for n in dir(kd) if n.startswith("sample_") or n.startswith("get_sigmas_")]
    assert len(names) == 17
    for name in [*names, "to_d", "get_ancestral_step", "append_zero", "default_noise_sampler"]:
        theirs = list(inspect.signature(getattr(kd, name)).parameters.values())
        mine = list(inspect.signature(getattr(ours, name)).parameters.values())[: len(theirs)]
        assert [(p.name, p.default) for p in mine] == [(p.name, p.default) for p in theirs], name


def test_extra_args_reach_the_model():
    sig = ours.get_sigmas_karras(4, 0.01, 10.0)
    seen = []

    def model(x, sigma, *, tag):
        seen.append(tag)
        return denoiser(x, sigma)

    x0 = torch.randn(2, 3) * 10
    for name in [n for n in ours.__all__ if n.startswith("sample_")]:
        seen.clear()
        fn = getattr(ours, name)
        if name in ("sample_dpm_fast", "sample_dpm_adaptive"):
            fn(
                model,
                x0,
                0.01,
                10.0,
                *([4] if name == "sample_dpm_fast" else []),
                extra_args={"tag": name},
                disable=True,
            )
        else:
            fn(model, x0, sig, extra_args={"tag": name}, disable=True)
        assert seen and set(seen) == {name}


@pytest.mark.parametrize(
    "name,kwargs,arg",
    [
        ("sample_dpm_2_ancestral", {"eta": -0.1}, "eta"),
        ("sample_dpmpp_2s_ancestral", {"s_noise": float("nan")}, "s_noise"),
        ("sample_dpmpp_sde", {"r": 0.0}, "r"),
        ("sample_dpmpp_sde", {"eta": float("inf")}, "eta"),
        ("sample_dpm_2_ancestral", {"sigmas": torch.tensor([5.0, 0.0, 0.0])}, "sigmas"),
        ("sample_dpm_fast", {"n": 0}, "n"),
        ("sample_dpm_fast", {"sigma_min": 0.0}, "sigma_min"),
        ("sample_dpm_fast", {"sigma_min": 20.0, "eta": 0.5}, "eta"),
        ("sample_dpm_fast", {"sigma_max": 0.01}, "sigma_min"),
        ("sample_dpm_adaptive", {"order": 1}, "order"),
        ("sample_dpm_adaptive", {"rtol": -1e-3}, "rtol"),
        ("sample_dpm_adaptive", {"atol": 0.0}, "atol"),
        ("sample_dpm_adaptive", {"h_init": 0.0}, "h_init"),
        ("sample_dpm_adaptive", {"sigma_max": -1.0}, "sigma_max"),
        ("sample_dpm_adaptive", {"pcoeff": float("nan")}, "pcoeff"),
        ("sample_dpm_adaptive", {"accept_safety": float("inf")}, "accept_safety"),
        ("sample_dpm_adaptive", {"sigma_min": 20.0, "eta": 0.5}, "eta"),
    ],
)
def test_new_samplers_bad_input(name, kwargs, arg):
    fn = getattr(ours, name)
    x = torch.randn(2, 3)
    if name in ("sample_dpm_fast", "sample_dpm_adaptive"):
        kw = {"sigma_min": 0.01, "sigma_max": 10.0, **({"n": 5} if name == "sample_dpm_fast" else {}), **kwargs}
        call = lambda: fn(denoiser, x, disable=True, **kw)  # noqa: E731
    else:
        kw = {"sigmas": ours.get_sigmas_karras(4, 0.01, 10.0), **kwargs}
        call = lambda: fn(denoiser, x, disable=True, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=arg):
        call()
    with pytest.raises(TypeError, match="noise_sampler"):
        ours.sample_dpmpp_sde(denoiser, x, ours.get_sigmas_karras(4, 0.01, 10.0), noise_sampler=3)
