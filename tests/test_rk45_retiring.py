"""Finished samples retire from rk45's eager loop (per-sample error norm): the network then runs on
the samples still integrating only, and every sample's result is the one it gets in a full batch."""

from __future__ import annotations

import math

import pytest
import torch

import scorefast as sf
from scorefast.sde import VPSDE
from scorefast.solvers import rk45, solve


class Rows:
    """dy/dt = -c y (c per sample, handed in as a ``per_sample`` row), counting sample-evaluations."""

    def __init__(self):
        self.rows_seen = 0

    def __call__(self, y, t, c):
        self.rows_seen += y.shape[0]
        return -c[:, None] * y


def _problem(B=37, D=5):
    """fp32 state (the package's fused kernels: bitwise batch-invariant; the float64 torch reference
    rounds its elementwise tails differently by position, DESIGN.md)."""
    g = torch.Generator().manual_seed(0)
    y0 = torch.randn(B, D, generator=g)
    c = torch.rand(B, generator=g) * 3 + 0.1
    t1 = torch.rand(B, generator=g, dtype=torch.float64) * 4 + 0.2  # samples end at different times
    return y0, c, t1


def test_retired_samples_keep_their_full_batch_results_and_rows():
    y0, c, t1 = _problem()
    retiring, full = Rows(), Rows()
    got = solve(retiring, y0, 0.0, t1, rtol=1e-6, atol=1e-6, per_sample=(c,))
    want = solve(full, y0, 0.0, t1, rtol=1e-6, atol=1e-6, per_sample=(c,), attempts=rk45._eager_attempts)
    for a, b in ((got.y, want.y), (got.nfe, want.nfe), (got.steps, want.steps), (got.rejected, want.rejected)):
        assert torch.equal(a, b)
    # each sample's own row reached its own solution (c and t1 stayed aligned with y as rows left)
    exact = y0.double() * torch.exp(-c.double() * t1)[:, None]
    torch.testing.assert_close(got.y.double(), exact, rtol=2e-5, atol=2e-6)
    # the point: evaluations only for unfinished samples (a full batch pays the slowest sample's NFE)
    assert retiring.rows_seen <= int(got.nfe.sum())
    assert full.rows_seen == int(got.nfe.max()) * y0.shape[0]
    assert retiring.rows_seen < 0.8 * full.rows_seen


def test_the_batch_error_norm_does_not_retire():
    """One norm over the batch: fewer rows would change it, so every sample stays to the end."""
    y0, c, t1 = _problem(B=9)
    fn = Rows()
    got = solve(fn, y0, 0.0, t1, rtol=1e-6, atol=1e-6, per_sample=(c,), error_norm="batch")
    assert fn.rows_seen == int(got.nfe.max()) * 9


def test_per_sample_rows_are_checked():
    y0, c, _ = _problem(B=4)
    with pytest.raises(ValueError, match=r"per_sample\[0\]"):
        solve(Rows(), y0, 0.0, 1.0, per_sample=(c[:3],))


def test_likelihood_probes_follow_their_samples():
    """log_likelihood retires samples too: each sample's NLL and NFE equal its own solve alone
    (probes and all), and the whole batch's equal the non-retiring loop's bitwise."""
    gm = sf.testing.GaussianMixture.builtin()
    sde = VPSDE()
    x = gm.sample(24, seed=3).float()
    score = gm.score_fn(sde)
    kw = dict(rtol=1e-4, atol=1e-4, seed=5, return_nfe=True)
    nll, _, nfe = sf.log_likelihood(score, sde, x, **kw)
    assert nfe.min() < nfe.max()  # samples did finish at different attempts
    original = rk45._retiring_attempts
    rk45._retiring_attempts = lambda live, remaining: rk45._eager_attempts
    try:
        nll_full, _, nfe_full = sf.log_likelihood(score, sde, x, **kw)
    finally:
        rk45._retiring_attempts = original
    assert torch.equal(nll, nll_full) and torch.equal(nfe, nfe_full)
    ids = torch.arange(24)
    for i in (0, int(nfe.argmin()), int(nfe.argmax())):
        one, _, n1 = sf.log_likelihood(score, sde, x[i : i + 1], sample_ids=ids[i : i + 1], **kw)
        assert int(n1) == int(nfe[i]) and math.isclose(float(one), float(nll[i]), rel_tol=0, abs_tol=1e-9)


def test_conditioning_rows_follow_their_samples_and_retire_false_keeps_the_batch():
    """A class-conditional score: labels in ``extra_args`` follow their samples as they retire; a
    score_fn that closes over the labels itself runs with ``retire=False`` (every call at B rows).
    Both give the same NLL and NFE per sample."""
    gm = sf.testing.GaussianMixture.builtin()
    sde = VPSDE()
    x = gm.sample(20, seed=4).float()
    labels = torch.arange(20) % 3
    base = gm.score_fn(sde)
    scale = torch.tensor([1.0, 0.9, 1.1])  # a per-class tilt of the score (a made-up condition)

    def cond(xx, t, y):
        assert y.shape[0] == xx.shape[0]
        return base(xx, t) * scale[y][:, None]

    def closed(xx, t):
        assert xx.shape[0] == labels.shape[0], "a closure over [B] labels needs the whole batch"
        return cond(xx, t, labels)

    kw = dict(rtol=1e-4, atol=1e-4, seed=2, return_nfe=True)
    nll, _, nfe = sf.log_likelihood(cond, sde, x, extra_args={"y": labels}, **kw)
    assert nfe.min() < nfe.max()
    nll_closed, _, nfe_closed = sf.log_likelihood(closed, sde, x, retire=False, **kw)
    assert torch.equal(nll, nll_closed) and torch.equal(nfe, nfe_closed)
    with pytest.raises(AssertionError, match="whole batch"):
        sf.log_likelihood(closed, sde, x, **kw)
    with pytest.raises(ValueError, match=r"extra_args\['y'\]"):
        sf.log_likelihood(cond, sde, x, extra_args={"y": labels[:5]}, **kw)
    with pytest.raises(TypeError, match="retire"):
        sf.log_likelihood(cond, sde, x, extra_args={"y": labels}, retire="no", **kw)


def test_retire_false_runs_every_call_on_the_whole_batch():
    y0, c, t1 = _problem(B=11)
    fn = Rows()
    got = solve(fn, y0, 0.0, t1, rtol=1e-6, atol=1e-6, per_sample=(c,), retire=False)
    assert fn.rows_seen == int(got.nfe.max()) * 11
