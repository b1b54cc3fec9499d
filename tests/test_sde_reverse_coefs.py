"""The built-in SDEs' ``reverse_coefs`` (shared subexpressions once) against the generic base-class path
(``drift_coef``, ``diffusion``): the same maths, so within a few float64 ulps at every time."""

import pytest
import torch

import scorefast as sf
from scorefast.sde.base import SDE

SDES = {
    "vp": sf.sde.VPSDE(),
    "subvp": sf.sde.SubVPSDE(),
    "ve": sf.sde.VESDE(),
    "edm": sf.sde.EDM(),
    "rf": sf.sde.RectifiedFlow(3.0),
    "discrete_vp": sf.sde.DiscreteVP.cosine(),
}


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("probability_flow", [False, True])
def test_reverse_coefs_match_generic(name, probability_flow):
    sde = SDES[name]
    u = torch.linspace(0, 1, 257, dtype=torch.float64)
    t = (sde.eps + u * (sde.T - sde.eps)).reshape(1, -1).expand(2, -1)  # [S, B] stage times
    a, b = sde.reverse_coefs(t, probability_flow=probability_flow)
    a0, b0 = SDE._generic_reverse_coefs(sde, t, probability_flow)
    assert a.shape == b.shape == t.shape and a.dtype == b.dtype == torch.float64
    torch.testing.assert_close(a, a0, rtol=4e-16, atol=0)
    torch.testing.assert_close(b, b0, rtol=8e-16, atol=0)


def test_vp_ode_b_is_a_exactly():
    t = torch.linspace(1e-3, 1, 101, dtype=torch.float64)
    a, b = sf.sde.VPSDE().reverse_coefs(t, probability_flow=True)
    assert torch.equal(a, b)
    a2, b2 = sf.sde.VPSDE().reverse_coefs(t)
    assert torch.equal(a2, a) and torch.equal(b2, 2 * a)


def test_a_subclass_with_its_own_schedule_takes_the_generic_path():
    """The built-ins' shortcut formulas hold only for their own schedules: a subclass that overrides
    beta / sigma / diffusion / drift_coef gets the coefficients of its own methods."""
    from scorefast.sde.base import SDE

    class QuadVP(sf.sde.VPSDE):
        def beta(self, t):
            return self.beta_0 + t**2 * (self.beta_1 - self.beta_0)

    class WideEDM(sf.sde.EDM):
        def diffusion(self, t):
            return torch.sqrt(4 * t)

    class SlowVE(sf.sde.VESDE):
        def sigma(self, t):
            return self.sigma_min * (self.sigma_max / self.sigma_min) ** (t * t)

    t = torch.tensor([0.25, 0.5, 0.9], dtype=torch.float64)
    for sde in (QuadVP(), WideEDM(), SlowVE()):
        for flow in (False, True):
            got, want = sde.reverse_coefs(t, probability_flow=flow), SDE._generic_reverse_coefs(sde, t, flow)
            for g, w in zip(got, want):
                torch.testing.assert_close(torch.as_tensor(g, dtype=torch.float64).expand(3), w, rtol=0, atol=0)


def test_adaptive_sde_takes_a_user_sdes_float32_coefficients():
    """A user SDE whose coefficients come back float32 (or expanded) still runs on the cpu kernels."""

    class Float32VP(sf.sde.VPSDE):
        def reverse_coefs(self, t, *, probability_flow=False):
            a, b = super().reverse_coefs(t, probability_flow=probability_flow)
            return a.float(), b.float().expand_as(b)

    gm = sf.testing.GaussianMixture.builtin()
    sde = Float32VP()
    x = sf.sample(gm.score_fn(sde), sde, (8, 2), sampler="adaptive_sde", seed=0, backend="cpu", rtol=0.2, atol=0.2)
    assert bool(torch.isfinite(x).all())
