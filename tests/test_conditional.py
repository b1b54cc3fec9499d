"""sf.conditional: inpainting, colorisation and guidance."""

from __future__ import annotations

import math

import pytest
import torch

import scorefast as sf
from scorefast.sde import EDM, VPSDE

RHO = 0.8
COV = torch.tensor([[1.0, RHO], [RHO, 1.0]], dtype=torch.float64)


def _gaussian():
    return sf.testing.GaussianMixture([1.0], [[0.0, 0.0]], COV[None])


@pytest.mark.parametrize(
    "sampler,sde,steps,options",
    [
        ("pc", VPSDE(), 300, {"norm": "batch"}),
        ("euler_maruyama", VPSDE(), 300, {}),
        ("heun", EDM(), 30, {}),
    ],
)
def test_inpainting_keeps_known_part_and_samples_the_conditional(sampler, sde, steps, options):
    """Correlated 2-D Gaussian, x0 known = 1.5; x1 | x0 ~ N(rho * 1.5, 1 - rho^2).

    Replacement conditioning (score_sde's) re-noises the known part independently of the unknown
    one, so on correlated data it is biased towards the prior: it pulls x1 towards the conditional
    but not all the way.  It is exact in law when the parts are independent (next test).
    """
    gm = _gaussian()
    n = 4000
    data = torch.zeros(n, 2)
    data[:, 0] = 1.5
    mask = torch.tensor([1.0, 0.0])
    x = sf.conditional.inpaint(gm.score_fn(sde), sde, data, mask, sampler=sampler, steps=steps, seed=4, **options)
    assert torch.equal(x[:, 0], data[:, 0])  # the known part is the data exactly
    cond_mean = RHO * 1.5
    assert 0.25 * cond_mean < x[:, 1].mean().item() < cond_mean + 0.1  # unconditional mean: 0
    assert x[:, 1].var().item() < 1.0  # unconditional variance: 1


def test_inpainting_with_independent_coordinates_is_exact_in_law():
    gm = sf.testing.GaussianMixture([1.0], [[0.0, 2.0]], [[1.0, 0.25]])
    sde = VPSDE()
    n = 4000
    data = torch.zeros(n, 2)
    x = sf.conditional.inpaint(gm.score_fn(sde), sde, data, torch.tensor([1.0, 0.0]), sampler="ddim", steps=100, seed=1)
    assert abs(x[:, 1].mean().item() - 2.0) < 0.05 and abs(x[:, 1].var().item() - 0.25) < 0.03


def test_inpainting_draws_do_not_collide_and_are_declared(monkeypatch):
    from tests.draws import record_draws

    draws = record_draws(monkeypatch)  # sampler draws and re-noisings both reach a kernel
    gm = _gaussian()
    sde = VPSDE()
    sf.conditional.inpaint(
        gm.score_fn(sde), sde, torch.zeros(3, 2), torch.tensor([1.0, 0.0]), sampler="euler_maruyama", steps=5
    )
    seen = [k for _, k in draws]
    # 4 sampler draws (the last step is the noise-free denoise) + 4 re-noisings (none after the last step)
    assert len(seen) == len(set(seen)) == 4 + 4
    assert max(seen) < 5 * 2  # within the declared S = 1 + 1 draws per step


def test_colorize_keeps_the_grey_level():
    sde = VPSDE()
    gm = sf.testing.GaussianMixture([1.0], [[0.0] * 12], 0.5)

    def score(x, t):
        return gm.score(x.reshape(x.shape[0], -1), t, sde).reshape(x.shape).to(x.dtype)

    gray = torch.rand(4, 1, 2, 2)
    x = sf.conditional.colorize(score, sde, gray, sampler="ddim", steps=30, seed=2)
    assert x.shape == (4, 3, 2, 2)
    decoupled = torch.einsum("bihw,ij->bjhw", x.double(), sf.conditional.DECOUPLE)
    expected = torch.einsum("bihw,ij->bjhw", gray.expand(-1, 3, -1, -1).double(), sf.conditional.DECOUPLE)
    torch.testing.assert_close(decoupled[:, 0], expected[:, 0], atol=1e-5, rtol=1e-5)


def test_guidance_arithmetic():
    x = torch.randn(5, 3)
    t = torch.full((5,), 0.3)

    def score(x, t, label):
        return -x + label[:, None].float()

    g = sf.conditional.guided(score, cfg_scale=3.0, uncond_args={"label": torch.zeros(5, dtype=torch.long)})
    label = torch.arange(5)
    s_c, s_u = score(x, t, label), score(x, t, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(g(x, t, label=label), s_u + 3.0 * (s_c - s_u))
    one = sf.conditional.guided(score, cfg_scale=1.0, uncond_args={"label": torch.zeros(5, dtype=torch.long)})
    torch.testing.assert_close(one(x, t, label=label), s_c)
    cg = sf.conditional.guided(score, classifier_grad=lambda x, t, label: torch.ones_like(x), classifier_scale=2.0)
    torch.testing.assert_close(cg(x, t, label=label), s_c + 2.0)
    # usable with any sampler
    out = sf.sample(g, VPSDE(), (5, 3), sampler="dpm_solver++", steps=5, extra_args={"label": label})
    assert torch.isfinite(out).all()


def test_conditional_bad_input():
    sde = VPSDE()
    with pytest.raises(ValueError, match="mask"):
        sf.conditional.inpaint(lambda x, t: -x, sde, torch.zeros(2, 2), torch.tensor([0.5, 1.0]), steps=3)
    with pytest.raises(ValueError, match="mask"):
        sf.conditional.inpaint(lambda x, t: -x, sde, torch.zeros(2, 2), torch.ones(3), steps=3)
    with pytest.raises(ValueError, match="rk45"):
        sf.conditional.inpaint(lambda x, t: -x, sde, torch.zeros(2, 2), torch.ones(2), sampler="rk45")
    with pytest.raises(ValueError, match="gray"):
        sf.conditional.colorize(lambda x, t: -x, sde, torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="cfg_scale"):
        sf.conditional.guided(lambda x, t: -x)
    with pytest.raises(ValueError, match="uncond_args"):
        sf.conditional.guided(lambda x, t: -x, cfg_scale=2.0)


def test_conditional_bad_input_is_named():
    sde = VPSDE()
    with pytest.raises(TypeError, match="score_fn"):
        sf.conditional.guided(None, cfg_scale=2.0, uncond_args={})
    with pytest.raises(TypeError, match="uncond_args"):
        sf.conditional.guided(lambda x, t: -x, cfg_scale=2.0, uncond_args=[0])
    with pytest.raises(ValueError, match="data: the known part"):
        sf.conditional.inpaint(lambda x, t: -x, sde, torch.full((2, 2), math.nan), torch.ones(2, 2), steps=3)
    with pytest.raises(TypeError, match="mask"):
        sf.conditional.inpaint(lambda x, t: -x, sde, torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="gray"):
        sf.conditional.colorize(lambda x, t: -x, sde, torch.full((1, 1, 2, 2), math.inf), steps=3)


def test_inpainting_never_reads_the_unknown_part():
    """Before: NaN in the unknown part of data (a common placeholder) reached the state through
    known * mask (NaN * 0 = NaN) and ended the run with a NonFiniteError blamed on the score."""
    sde = VPSDE()
    data = torch.tensor([[1.0, math.nan], [2.0, math.nan]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    out = sf.conditional.inpaint(lambda x, t: -x, sde, data, mask, sampler="ddim", steps=5, seed=3)
    zeros = sf.conditional.inpaint(lambda x, t: -x, sde, torch.nan_to_num(data), mask, sampler="ddim", steps=5, seed=3)
    assert torch.equal(out, zeros) and torch.equal(out[:, 0], data[:, 0])


def test_inpainting_on_discrete_vp_noises_the_known_part_to_the_last_grid_time():
    """DiscreteVP's grid ends at t = 0, its least noisy table entry (sigma_0 > 0), not the data end:
    the known part must still be noised there before the last step (it was taken as the data end)."""
    sde = sf.sde.DiscreteVP.linear()
    data, mask = torch.ones(3, 2), torch.tensor([1.0, 0.0])
    seen = []
    sf.conditional.inpaint(lambda x, t: -x, sde, data, mask, sampler="ddim", steps=4, callback=seen.append)
    before_last = seen[-2]["x"][:, 0]  # after step N-2: known noised to t_{N-1} = 0, i.e. sigma_0
    a0 = sde.mean_coef(torch.zeros(1, dtype=torch.float64)).item()
    assert not torch.equal(before_last, data[:, 0]) and (before_last - a0).abs().max() < 0.1
    assert torch.equal(seen[-1]["x"][:, 0], data[:, 0])
