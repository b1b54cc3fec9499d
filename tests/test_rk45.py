"""The adaptive Dormand–Prince solver ends, and says why: NaN/inf, a blow-up, max_steps (issue 18, item 3).

Before, a NaN score or NaN data ran 100,000 rejected attempts (minutes) and then raised a bare
``RuntimeError``; now the first attempt with a non-finite stage ends the loop with
``NonFiniteError`` naming the step and time, read from a device flag (also under graph capture).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import scorefast as sf
from scorefast import graphs
from scorefast.errors import NonFiniteError
from scorefast.sde import VPSDE
from scorefast.solvers import SolverError, solve


class Counting:
    """fn(y, t) that counts its calls and turns NaN once t crosses ``bad_after`` (per sample)."""

    def __init__(self, fn, bad_after=None, direction=1.0, value=float("nan")):
        self.fn, self.bad_after, self.direction, self.value, self.calls = fn, bad_after, direction, value, 0

    def __call__(self, y, t):
        self.calls += 1
        out = self.fn(y, t)
        if self.bad_after is None:
            return out
        bad = ((t - self.bad_after) * self.direction > 0).reshape(-1, *([1] * (out.dim() - 1)))
        return torch.where(bad, torch.full_like(out, self.value), out)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nan_stage_ends_the_solver_at_once_with_its_step_and_time(value):
    fn = Counting(lambda y, t: -y, bad_after=0.5, value=value)
    with pytest.raises(NonFiniteError, match=r"rk45: non-finite values at step \d+ \(the attempt from t = 0\.\d+"):
        solve(fn, torch.ones(5, 3), 0.0, 2.0)
    assert fn.calls < 60  # a handful of attempts, not max_steps of them


def test_a_blow_up_ends_with_a_solver_error_and_max_steps_is_named():
    fn = Counting(lambda y, t: y * y)  # y' = y^2 from 1 blows up at t = 1
    with pytest.raises(SolverError, match=r"step size underflowed at step \d+ \(the attempt from t = 1"):
        solve(fn, torch.ones(3, 2, dtype=torch.float64), 0.0, 2.0)
    assert fn.calls < 5000
    with pytest.raises(SolverError, match=r"max_steps: rk45 stopped after 3 attempts with 2 of 2 samples short"):
        solve(lambda y, t: -y, torch.ones(2, 2), 0.0, 5.0, max_steps=3)


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graphed"])
def test_rk45_sampler_with_a_nan_score_raises_at_the_first_bad_attempt(graphed):
    sde = VPSDE()
    score = Counting(lambda x, t: -x, bad_after=0.6, direction=-1.0)  # NaN once t < 0.6 (reverse time)
    with warnings.catch_warnings(), graphs.emulated(), pytest.raises(NonFiniteError, match=r"t = 0\.[6-9]"):
        warnings.simplefilter("error")  # the attempt is captured, not run eagerly after a failed capture
        sf.sample(score, sde, (6, 2), sampler="rk45", rtol=1e-4, atol=1e-4, cuda_graph=graphed)
    assert score.calls < 200


def test_rk45_sampler_batch_error_norm_and_options():
    sde = VPSDE()
    _, info = sf.sample(lambda x, t: -x, sde, (6, 2), sampler="rk45", error_norm="batch", return_info=True)
    assert (info["nfe_per_sample"] == info["nfe"]).all()
    with pytest.raises(ValueError, match="error_norm"):
        sf.sample(lambda x, t: -x, sde, (2, 2), sampler="rk45", error_norm="max")
    with pytest.raises(SolverError, match="max_steps"):
        sf.sample(lambda x, t: -3 * x, sde, (2, 2), sampler="rk45", max_steps=2)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_likelihood_of_non_finite_data_or_score_raises_at_once(value):
    gm = sf.testing.GaussianMixture.ring(4, 2.0, 0.5)
    sde = VPSDE()
    x = gm.sample(4, seed=0).float()
    x[2, 1] = value
    with pytest.raises(NonFiniteError, match="x: "):
        sf.log_likelihood(gm.score_fn(sde), sde, x)
    score = Counting(gm.score_fn(sde), bad_after=0.3)
    with pytest.raises(NonFiniteError, match=r"log_likelihood: non-finite values at step \d+ \(the attempt from t = "):
        sf.log_likelihood(score, sde, gm.sample(4, seed=0).float())
    assert score.calls < 100


def test_solver_bad_input_names_the_argument():
    y0 = torch.ones(2, 2)
    for kwargs, exc, name in [
        (dict(fn=None), TypeError, "fn"),
        (dict(y0=[[1.0]]), TypeError, "y0"),
        (dict(t1=float("nan")), ValueError, "t1"),
        (dict(rtol=-1.0), ValueError, "rtol"),
        (dict(h0=0.0), ValueError, "h0"),
        (dict(error_norm="l1"), ValueError, "error_norm"),
        (dict(q0=torch.zeros(2, 1)), ValueError, "q0"),
    ]:
        args = {"fn": lambda y, t: -y, "y0": y0, "t0": 0.0, "t1": 1.0, **kwargs}
        with pytest.raises(exc, match=name):
            solve(args.pop("fn"), args.pop("y0"), args.pop("t0"), args.pop("t1"), **args)


def test_stage_combinations_in_passes_of_four_terms_match_one_pass():
    """The triton and cuda kernels take at most 4 terms: longer Dormand–Prince combinations run in
    several passes (here forced on the cpu backend) and agree with the single pass to fp32 rounding."""
    from scorefast.solvers import adaptive
    from scorefast.solvers.rk45 import COMBOS

    g = torch.Generator().manual_seed(0)
    y = torch.randn(5, 7, generator=g)
    ks = [torch.randn(5, 7, generator=g) for _ in range(7)]
    h = torch.rand(5, generator=g, dtype=torch.float64)
    one, four = adaptive.Combos(COMBOS, y, "cpu"), adaptive.Combos(COMBOS, y, "cpu", limit=4)
    assert [len(p) for p in four.passes.values()] == [1, 1, 1, 1, 2, 2, 2]
    for combos in (one, four):
        combos.prepare(h)
    for key in COMBOS:
        x, terms = (y, ks) if key != "err" else (ks[0], ks[1:])
        w = COMBOS[key]
        expected = (w[0][0] + w[0][1] * h[:, None]) * x.double() + sum(
            (c + m * h[:, None]) * k.double() for (c, m), k in zip(w[1:], terms)
        )
        torch.testing.assert_close(one(key, x, terms).double(), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(four(key, x, terms), one(key, x, terms), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("error_norm,retire", [("sample", False), ("sample", True), ("batch", False)])
def test_skipping_the_idle_stages_quadrature_changes_nothing(error_norm, retire):
    """Dormand–Prince's second stage has weight zero in the solution and the error estimate: with
    ``skip_idle_quadrature`` fn is asked for dq there not at all (once per attempt, ``quadrature=False``)
    and the solution, the quadrature and the step counts are bitwise those of the full solve."""
    y0 = torch.linspace(-2, 2, 10, dtype=torch.float32).reshape(5, 2)
    flags = []

    def fn(y, t, quadrature=True):
        flags.append(quadrature)
        dy = -y * (1 + t[:, None].to(y.dtype)) + 0.3 * torch.sin(3 * y)
        return dy, (torch.cos(y).sum(1, keepdim=True) * t[:, None]).double() if quadrature else None

    kw = dict(rtol=1e-5, atol=1e-5, q0=torch.zeros(5, 1, dtype=torch.float64), error_norm=error_norm, retire=retire)
    full = solve(lambda y, t: fn(y, t), y0, 0.0, 1.0, **kw)
    assert all(flags)
    flags.clear()
    skip = solve(fn, y0, 0.0, 1.0, skip_idle_quadrature=True, **kw)
    assert torch.equal(skip.y, full.y) and torch.equal(skip.q, full.q) and torch.equal(skip.nfe, full.nfe)
    attempts = int((skip.steps + skip.rejected).max())
    assert flags.count(False) == attempts and len(flags) == 2 + 6 * attempts
    # the first stage call of each attempt
    assert [i for i, f in enumerate(flags[2:]) if not f] == [6 * a for a in range(attempts)]


@pytest.mark.parametrize("D", [1, 2, 3, 7, 8, 13, 100])
def test_tree_sum_adds_each_element_to_the_one_half_a_width_away(D):
    """The solvers' fixed summation tree: zero-padded to a power of two, then each level adds
    element i to element i + half (one rounding each), so a sample's sum never depends on the batch.
    Held against that rule written out with slices, bitwise, on values spread over 16 decades."""
    from scorefast.solvers.adaptive import tree_sum

    g = torch.Generator().manual_seed(D)
    v = torch.randn(4, 9, D, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-8, 8, (4, 9, D), generator=g)
    v[0, 0], v[0, 1] = 0.0, -0.0  # a row of zeros and one of negative zeros: the sum's sign too
    v[1, ::3] = v[1, ::3].where(torch.rand(v[1, ::3].shape, generator=g) < 0.5, -0.0)
    for x in (v, v.float(), v.transpose(0, 1)):
        want = torch.nn.functional.pad(x, (0, (1 << max(D - 1, 0).bit_length()) - D))
        while want.shape[-1] > 1:
            half = want.shape[-1] // 2
            want = want[..., :half] + want[..., half:]
        got = tree_sum(x)
        assert torch.equal(got, want[..., 0]) and torch.equal(got.signbit(), want[..., 0].signbit())
        assert torch.equal(tree_sum(x[:1]), want[:1, ..., 0])  # one row alone: the same sums
