"""Score-matching losses against float64 references and closed forms; EMA."""

from __future__ import annotations

import math

import pytest
import torch

import scorefast as sf
from scorefast.sde import EDM, VESDE, VPSDE, DiscreteVP, SubVPSDE
from tests.test_samplers import C, M, linear_score

exact_score = linear_score  # the exact perturbed score of N(M, C)


@pytest.mark.parametrize("sde", [VESDE(), VPSDE(), SubVPSDE()], ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("likelihood_weighting,reduce_mean", [(False, False), (True, True)])
def test_dsm_loss_matches_score_sde_formula(sde, likelihood_weighting, reduce_mean):
    B, D = 64, 3
    x = torch.randn(B, D, dtype=torch.float64)
    net = lambda y, t: -y / (1 + t[:, None]) + 0.1  # noqa: E731
    got = sf.losses.dsm_loss(
        net, x, sde, seed=3, step=7, likelihood_weighting=likelihood_weighting, reduce_mean=reduce_mean
    )
    # float64 reference written as score_sde's get_sde_loss_fn, with the same stream draws
    u = sf.rand((B, 1), seed=3, step=7, stream=4, dtype=torch.float64)[:, 0]
    t = u * (sde.T - 1e-5) + 1e-5
    z = sf.randn((B, D), seed=3, step=7, stream=2, dtype=torch.float64)
    mean, std = sde.marginal_prob(x, t)
    perturbed = mean + std[:, None] * z
    score = net(perturbed, t)
    if not likelihood_weighting:
        losses = torch.square(score * std[:, None] + z)
    else:
        losses = torch.square(score + z / std[:, None]) * sde.sde(torch.zeros_like(x), t)[1][:, None] ** 2
    losses = losses.mean(1) if reduce_mean else losses.sum(1)
    torch.testing.assert_close(got, losses.mean(), rtol=1e-10, atol=1e-10)
    f32 = sf.losses.dsm_loss(
        lambda y, t: net(y, t).float(),
        x.float(),
        sde,
        seed=3,
        step=7,
        likelihood_weighting=likelihood_weighting,
        reduce_mean=reduce_mean,
    )
    assert f32.item() == pytest.approx(losses.mean().item(), rel=1e-4)


def test_dsm_minimiser_is_the_exact_perturbed_score():
    sde = VPSDE()
    x = M + math.sqrt(C) * torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = exact_score(sde)
    losses = {
        th: sf.losses.dsm_loss(lambda y, t, th=th: exact(y, t) * (1 + th), x, sde, seed=1).item()
        for th in (-0.1, 0.0, 0.1)
    }
    assert losses[0.0] < losses[-0.1] and losses[0.0] < losses[0.1], losses


def test_edm_loss_formula():
    sde = EDM()
    B = 32
    x = torch.randn(B, 2, dtype=torch.float64)
    net = lambda y, sigma: -y / (sigma[:, None] ** 2 + 0.25)  # noqa: E731
    got = sf.losses.dsm_loss(net, x, sde, seed=2, step=1)
    n = sf.randn((B, 1), seed=2, step=1, stream=4, dtype=torch.float64)[:, 0]
    sigma = torch.exp(-1.2 + 1.2 * n)
    y = x + sigma[:, None] * sf.randn((B, 2), seed=2, step=1, stream=2, dtype=torch.float64)
    D = y + sigma[:, None] ** 2 * net(y, sigma)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(got, (weight * ((D - x) ** 2).sum(1)).mean())


def test_sliced_and_exact_score_matching_agree_in_expectation():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    score = lambda x: -x @ A.T + b  # noqa: E731
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    exact = sf.losses.score_matching_loss(score, x, return_per_sample=True)
    analytic = -torch.trace(A) + 0.5 * (score(x) ** 2).sum(1)
    torch.testing.assert_close(exact, analytic)
    ssm = sf.losses.ssm_loss(score, x, n_projections=4000, seed=1, return_per_sample=True)
    frob = 0.5 * ((A + A.T) ** 2).sum().item()  # variance of v^T J v for Gaussian v
    assert (ssm - exact).abs().max().item() < 5 * math.sqrt(frob / 4000)
    # gradients flow to the model through the double backward
    w = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    sf.losses.ssm_loss(lambda y: w * score(y), x, seed=1).backward()
    assert w.grad is not None and torch.isfinite(w.grad)


def test_loss_bad_input():
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="sde"):
        sf.losses.dsm_loss(lambda y, t: y, x, DiscreteVP.linear())
    with pytest.raises(ValueError, match="eps"):
        sf.losses.dsm_loss(lambda y, t: y, x, VPSDE(), eps=0.0)
    with pytest.raises(ValueError, match="n_projections"):
        sf.losses.ssm_loss(lambda y: y, x, n_projections=0)


def test_ema_rule_warmup_swap_and_state():
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    ema = sf.train.EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update()  # shadow = 0.9 * 1 + 0.1 * 2
    torch.testing.assert_close(ema.shadow[0], torch.full((2, 3), 1.1))
    with ema.swap():
        assert torch.allclose(model.weight, torch.full((2, 3), 1.1))
    assert torch.equal(model.weight, torch.full((2, 3), 2.0))  # live weights restored
    warm = sf.train.EMA(model, decay=0.999, warmup=10)
    assert warm.current_decay() == pytest.approx(1 / 11)
    warm.update()
    assert warm.current_decay() == pytest.approx(2 / 12)
    other = sf.train.EMA(torch.nn.Linear(3, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.shadow[0], ema.shadow[0])
    assert other.decay == 0.9 and other.num_updates == 1
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="decay"):
            sf.train.EMA(model, decay=bad)
    with pytest.raises(RuntimeError, match="boom"), ema.swap():
        raise RuntimeError("boom")
    assert torch.equal(model.weight, torch.full((2, 3), 2.0))  # restored on error too
