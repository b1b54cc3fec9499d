"""scorefast.compat.k_diffusion against the real k-diffusion: same model, same noise.

Accuracy rule (flash-attention's): our fp32 result's error against k-diffusion run in float64 is at
most 2x k-diffusion's own fp32 error (plus a few ulps of the result's scale).
"""

from __future__ import annotations

import inspect

import pytest
import torch

import scorefast as sf
from scorefast.compat import k_diffusion as ours
from scorefast.sde import EDM
from tests.peers import k_diffusion_sampling

GM = sf.testing.GaussianMixture.ring(5, 2.0, 0.4, dim=3)
SDE = EDM()
B, N = 7, 12


def denoiser(x, sigma):
    """The mixture's exact D(x, sigma) = x + sigma^2 score (nonlinear in x)."""
    s = GM.score(x.double(), sigma.double(), SDE)
    return (x.double() + sigma.double()[:, None] ** 2 * s).to(x.dtype)


def _noises(dtype):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(B, 3, generator=g, dtype=torch.float64).to(dtype) for _ in range(N + 1)]


class _Sampler:
    """noise_sampler(sigma, sigma_next) returning the i-th fixed noise, i found from sigma."""

    def __init__(self, sigmas, noises):
        self.sigmas, self.noises = sigmas.double().tolist(), noises

    def __call__(self, sigma, sigma_next):
        return self.noises[self.sigmas.index(float(sigma))].clone()


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
]


def _run(fn, x, sigmas, noises, options, monkeypatch, *, churn_patch):
    """Run fn with its churn randn_like patched (k-diffusion) or a noise sampler (ours)."""
    kw = dict(options)
    uses_sampler = "noise_sampler" in inspect.signature(fn).parameters
    if churn_patch:  # k-diffusion's churn samplers draw torch.randn_like once per step
        it = iter(noises)
        monkeypatch.setattr(torch, "randn_like", lambda t, **_: next(it).clone())
    if uses_sampler and (not churn_patch or "ancestral" in fn.__name__ or "sde" in fn.__name__):
        kw["noise_sampler"] = _Sampler(sigmas, noises)
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
