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
    a0, b0 = SDE.reverse_coefs(sde, t, probability_flow=probability_flow)
    assert a.shape == b.shape == t.shape and a.dtype == b.dtype == torch.float64
    torch.testing.assert_close(a, a0, rtol=4e-16, atol=0)
    torch.testing.assert_close(b, b0, rtol=8e-16, atol=0)


def test_vp_ode_b_is_a_exactly():
    t = torch.linspace(1e-3, 1, 101, dtype=torch.float64)
    a, b = sf.sde.VPSDE().reverse_coefs(t, probability_flow=True)
    assert torch.equal(a, b)
    a2, b2 = sf.sde.VPSDE().reverse_coefs(t)
    assert torch.equal(a2, a) and torch.equal(b2, 2 * a)
