"""sf.testing.GaussianMixture: exact scores, densities and samples, perturbed by any SDE."""

from __future__ import annotations

import math

import pytest
import torch

import scorefast as sf
from scorefast.sde import EDM, VESDE, VPSDE, DiscreteVP, SubVPSDE


def _mixture(d=3):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, d, d, generator=g, dtype=torch.float64)
    covs = A @ A.transpose(1, 2) + 0.5 * torch.eye(d, dtype=torch.float64)
    return sf.testing.GaussianMixture([0.3, 0.7], torch.randn(2, d, generator=g, dtype=torch.float64), covs)


@pytest.mark.parametrize(
    "sde", [None, VESDE(), VPSDE(), SubVPSDE(), EDM(), DiscreteVP.cosine()], ids=lambda s: type(s).__name__
)
def test_score_is_gradient_of_log_prob(sde):
    gm = _mixture()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    t = None if sde is None else torch.linspace(sde.eps + 0.01, sde.T * 0.9, 5, dtype=torch.float64)
    (grad,) = torch.autograd.grad(gm.log_prob(x, t, sde).sum(), x)
    torch.testing.assert_close(gm.score(x.detach(), t, sde), grad, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("sde", [None, VESDE(), VPSDE(), DiscreteVP.cosine()], ids=lambda s: type(s).__name__)
def test_log_prob_matches_torch_distributions(sde):
    """Against torch.distributions with each time's covariance a^2 Sigma_k + s^2 I built explicitly."""
    gm = _mixture()
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = None if sde is None else torch.linspace(sde.eps + 0.01, sde.T * 0.9, 6, dtype=torch.float64)
    expected = []
    for i in range(6):
        a, s = 1.0, 0.0
        if sde is not None:  # p_t's law as sde.marginal_prob defines it
            mean, std = sde.marginal_prob(torch.ones(1, 1, dtype=torch.float64), t[i : i + 1])
            a, s = float(mean), float(std)
        cov = a**2 * gm.covs + s**2 * torch.eye(3, dtype=torch.float64)
        comps = torch.distributions.MultivariateNormal(a * gm.means, cov)
        expected.append(torch.logsumexp(torch.log(gm.weights) + comps.log_prob(x[i]), 0))
    torch.testing.assert_close(gm.log_prob(x, t, sde), torch.stack(expected), atol=1e-11, rtol=1e-11)


def test_single_gaussian_closed_forms():
    gm = sf.testing.GaussianMixture([1.0], [[1.0, -2.0]], [[2.0, 0.5]])
    x = torch.tensor([[0.3, 0.1]], dtype=torch.float64)
    sde = VESDE()
    t = torch.tensor([0.4], dtype=torch.float64)
    var = torch.tensor([2.0, 0.5], dtype=torch.float64) + sde.sigma(t) ** 2
    expected = -0.5 * (((x - torch.tensor([1.0, -2.0])) ** 2) / var).sum() - 0.5 * torch.log(2 * math.pi * var).sum()
    assert gm.log_prob(x, t, sde).item() == pytest.approx(expected.item(), rel=1e-12)
    vp = VPSDE()
    a, s = vp.mean_coef(t), vp.std(t)
    score = -(x - a * torch.tensor([1.0, -2.0])) / (a**2 * torch.tensor([2.0, 0.5]) + s**2)
    torch.testing.assert_close(gm.score(x, t, vp), score, atol=1e-12, rtol=1e-12)


def test_samples_have_the_mixture_moments():
    gm = _mixture()
    x = gm.sample(200_000, seed=1)
    m, c = gm.mean_cov()
    n = x.shape[0]
    assert (x.mean(0) - m).abs().max() < 5 * math.sqrt(c.diag().max() / n)
    assert (torch.cov(x.T) - c).abs().max() < 0.05 * c.abs().max()
    # perturbed samples: mean scales with a(t), covariance a^2 C + s^2 I
    vp = VPSDE()
    t = torch.tensor([0.5], dtype=torch.float64)
    xt = gm.sample(200_000, seed=2, t=t.expand(200_000), sde=vp)
    a, s = vp.mean_coef(t).item(), vp.std(t).item()
    assert (xt.mean(0) - a * m).abs().max() < 0.02
    assert (torch.cov(xt.T) - (a * a * c + s * s * torch.eye(3))).abs().max() < 0.05


def test_bad_parameters():
    with pytest.raises(ValueError, match="weights"):
        sf.testing.GaussianMixture([-1.0], [[0.0]])
    with pytest.raises(ValueError, match="means"):
        sf.testing.GaussianMixture([1.0, 1.0], [[0.0]])
    with pytest.raises(ValueError, match="covs"):
        sf.testing.GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(ValueError, match="x"):
        _mixture().score(torch.zeros(2, 4))
