"""Divergence estimators and the probability-flow likelihood against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

import scorefast as sf
from scorefast.sde import EDM, VESDE, VPSDE

G = torch.Generator().manual_seed(0)
A = torch.randn(6, 6, generator=G, dtype=torch.float64)  # non-symmetric


def linear(x):
    return x @ A.T


def test_exact_trace_of_linear_map_and_mixture_score():
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(
        sf.divergence(linear, x, method="exact"), torch.full((3,), torch.trace(A).item(), dtype=torch.float64)
    )
    gm = sf.testing.GaussianMixture.ring(5, 2.0, 0.5, dim=3)
    sde = VPSDE()
    t = torch.full((4,), 0.3, dtype=torch.float64)
    y = torch.randn(4, 3, dtype=torch.float64)
    got = sf.divergence(lambda z: gm.score(z, t, sde), y, method="exact")
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda z: gm.score(z[None], t[:1], sde)[0], y[i])
        assert got[i].item() == pytest.approx(torch.trace(jac).item(), rel=1e-10)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_with_the_known_variance(probe):
    B = 40_000  # each sample draws its own probe: B independent one-probe estimates
    x = torch.zeros(B, 6, dtype=torch.float64)
    est, _ = sf.hutchinson_trace(linear, x, n_probes=1, probe=probe, seed=3)
    frob = 0.5 * ((A + A.T) ** 2).sum().item()
    var = frob - 2 * (torch.diag(A) ** 2).sum().item() if probe == "rademacher" else frob
    assert abs(est.mean().item() - torch.trace(A).item()) < 5 * math.sqrt(var / B)
    assert est.var().item() == pytest.approx(var, rel=0.06)


def test_jvp_and_vjp_agree_and_probes_use_stream_one_offsets():
    x = torch.randn(5, 6, dtype=torch.float64)
    a, _ = sf.hutchinson_trace(linear, x, n_probes=3, seed=1, step=2, ad="vjp")
    b, _ = sf.hutchinson_trace(linear, x, n_probes=3, seed=1, step=2, ad="jvp")
    torch.testing.assert_close(a, b)
    v = sf.divergence.__globals__["probes"](x, 3, seed=1, step=2)
    flat = sf.rademacher((5, 18), seed=1, step=2, stream=1, dtype=torch.float64)
    assert torch.equal(v[2], flat[:, 12:18])  # probe j is elements j*D .. (j+1)*D - 1


def test_hutchpp_beats_hutchinson_on_low_rank_plus_noise():
    D, B = 40, 400
    g = torch.Generator().manual_seed(1)
    U = torch.randn(D, 3, generator=g, dtype=torch.float64)
    M = 10 * U @ U.T + 0.1 * torch.randn(D, D, generator=g, dtype=torch.float64)
    x = torch.zeros(B, D, dtype=torch.float64)
    exact = torch.trace(M).item()
    hutch = sf.divergence(lambda z: z @ M.T, x, method="hutchinson", n_probes=9, seed=5)
    hpp = sf.divergence(lambda z: z @ M.T, x, method="hutch++", n_probes=9, seed=5)
    mse_h = ((hutch - exact) ** 2).mean().item()
    mse_pp = ((hpp - exact) ** 2).mean().item()
    assert mse_pp < 0.1 * mse_h, (mse_pp, mse_h)


def _exact_prior(gm, sde):
    return lambda z: gm.log_prob(z, torch.full((z.shape[0],), sde.T, dtype=torch.float64), sde)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(0.01, 10), EDM()], ids=lambda s: type(s).__name__)
def test_likelihood_exact_divergence_matches_closed_form(sde):
    gm = sf.testing.GaussianMixture.ring(4, 2.0, 0.5)
    eps = 1e-5 if not isinstance(sde, EDM) else sde.eps
    x = gm.sample(16, seed=4)
    nll, bpd, nfe = sf.log_likelihood(
        gm.score_fn(sde),
        sde,
        x,
        eps=eps,
        divergence="exact",
        rtol=1e-7,
        atol=1e-7,
        prior_logp=_exact_prior(gm, sde),
        return_nfe=True,
    )
    exact = -gm.log_prob(x, torch.full((16,), eps, dtype=torch.float64), sde)
    torch.testing.assert_close(nll, exact, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(bpd, nll / (2 * math.log(2)))
    assert (nfe > 0).all()


def test_likelihood_hutchinson_is_unbiased():
    gm = sf.testing.GaussianMixture.ring(4, 2.0, 0.5)
    sde = VPSDE()
    n = 400
    x = gm.sample(n, seed=5)
    kw = dict(rtol=1e-5, atol=1e-5, prior_logp=_exact_prior(gm, sde))
    exact, _ = sf.log_likelihood(gm.score_fn(sde), sde, x, divergence="exact", **kw)
    hutch, _ = sf.log_likelihood(gm.score_fn(sde), sde, x, divergence="hutchinson", seed=2, **kw)
    diff = hutch - exact
    assert abs(diff.mean().item()) < 5 * diff.std().item() / math.sqrt(n) + 1e-3
    assert diff.std().item() > 0  # it is an estimate, not the exact value


def test_dequantised_bits_per_dim_and_bad_input():
    gm = sf.testing.GaussianMixture.ring(4, 0.5, 0.3)
    sde = VPSDE()
    x = gm.sample(4, seed=1)
    nll, bpd = sf.log_likelihood(
        gm.score_fn(sde), sde, x, divergence="exact", data_range=(-1.0, 1.0), prior_logp=_exact_prior(gm, sde)
    )
    torch.testing.assert_close(bpd, nll / (2 * math.log(2)) + 7.0)  # score_sde's offset for [-1, 1] data
    with pytest.raises(ValueError, match="divergence"):
        sf.log_likelihood(gm.score_fn(sde), sde, x, divergence="hutch++")
    with pytest.raises(ValueError, match="eps"):
        sf.log_likelihood(gm.score_fn(sde), sde, x, eps=2.0)
    with pytest.raises(ValueError, match="method"):
        sf.divergence(linear, x, method="fd")
    with pytest.raises(ValueError, match="n_probes"):
        sf.divergence(linear, torch.zeros(2, 6), method="hutch++", n_probes=4)
    with pytest.raises(ValueError, match="probe"):
        sf.hutchinson_trace(linear, torch.zeros(2, 6), probe="uniform")
