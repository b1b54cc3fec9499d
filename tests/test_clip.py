"""TrainStep's gradient clipping (``scorefast.train.clip``): the cpu backend's one-call C++ kernel
against ``torch.nn.utils.clip_grad_norm_`` and a float64 reference, over odd sizes, the clip active
and idle, zero and non-finite gradients; and the TrainStep path that uses it."""

from __future__ import annotations

import copy

import pytest
import torch

import scorefast as sf
from scorefast import models
from scorefast.sde import VPSDE
from scorefast.train import TrainStep, clip

pytestmark = pytest.mark.skipif(not sf.backends.state("cpu").available, reason="cpu backend not built")

SHAPES = [(1,), (7,), (33, 5), (1025,), (3, 1024), (0,), (2049, 3)]  # tiles, Vec tails, an empty one


def _grads(scale: float, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * scale for s in SHAPES]


@pytest.mark.parametrize("scale,max_norm", [(1.0, 0.5), (1e-3, 1.0), (30.0, 1e-3), (1.0, 1e6)])
def test_the_kernel_clips_as_clip_grad_norm_does(scale, max_norm):
    grads = _grads(scale)
    ref = [g.clone() for g in grads]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in ref]
    for p, g in zip(params, ref):
        p.grad = g
    want = torch.nn.utils.clip_grad_norm_(params, max_norm)
    exact = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]))
    got = clip.clip_grad_norm([grads], max_norm, "cpu")
    assert got.dtype == torch.float32 and got.shape == ()
    # the float64 sums: within one float32 rounding of the exact norm (the reference's float32 trees are looser)
    assert abs(float(got) - float(exact)) <= 2**-23 * float(exact)
    assert abs(float(got) - float(want)) <= 4 * 2**-23 * float(exact)
    for g, p in zip(grads, params):
        torch.testing.assert_close(g, p.grad, rtol=6e-7, atol=0)  # the total's few ulps
    if float(exact) * (1 + 1e-6) < max_norm:  # idle: the gradients are untouched, bit for bit
        assert all(torch.equal(g, r) for g, r in zip(grads, _grads(scale)))


def test_the_coefficient_is_the_references_float32_arithmetic():
    """Given the same total, the kernel's gradients are the reference's bits (the coefficient is
    torch's reciprocal, product and clamp in float32, the scaling one float32 product)."""
    grads = _grads(5.0, seed=3)
    kernel = [g.clone() for g in grads]
    total = clip.clip_grad_norm([kernel], 0.7, "cpu")
    coef = torch.reciprocal(total + 1e-6).mul_(0.7).clamp_(max=1.0)
    for g, k in zip(grads, kernel):
        assert torch.equal(g * coef, k)


def test_zero_and_nonfinite_gradients():
    zeros = [torch.zeros(s) for s in SHAPES]
    assert float(clip.clip_grad_norm([zeros], 1.0, "cpu")) == 0.0 and all(not g.any() for g in zeros)
    bad = _grads(1.0)
    bad[2][3, 1] = float("nan")
    assert torch.isnan(clip.clip_grad_norm([bad], 1.0, "cpu")) and all(torch.isnan(g).all() for g in bad if g.numel())
    inf = _grads(1.0)
    inf[0][0] = float("inf")
    assert torch.isinf(clip.clip_grad_norm([inf], 1.0, "cpu"))


def test_other_groups_take_the_reference():
    """Several (device, dtype) groups, a float64 group, a non-contiguous gradient or another backend
    take the foreach reference (clip_grad_norm_'s arithmetic, bit for bit)."""
    cases = [
        ([_grads(3.0)[:3], [g.double() for g in _grads(3.0, 1)[:2]]], "cpu"),
        ([[g.double() for g in _grads(3.0)]], "cpu"),
        ([[torch.randn(6, 4).t(), torch.randn(5)]], "cpu"),
        ([_grads(3.0)], "torch"),
    ]
    for groups, backend in cases:
        mine = [[g.clone() for g in grads] for grads in groups]
        params = [torch.nn.Parameter(torch.zeros_like(g)) for grads in groups for g in grads]
        for p, g in zip(params, (g.clone() for grads in groups for g in grads)):
            p.grad = g
        want = torch.nn.utils.clip_grad_norm_(params, 0.5)
        got = clip.clip_grad_norm(mine, 0.5, backend)
        assert torch.equal(got.double(), want.double())
        assert all(torch.equal(g, p.grad) for g, p in zip((g for grads in mine for g in grads), params))


def test_the_kernel_refuses_what_it_does_not_take():
    kernel = sf.backends.get("cpu").load().clip_grad_norm
    with pytest.raises(RuntimeError, match="contiguous float32"):
        kernel([torch.zeros(3, dtype=torch.float64)], 1.0)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        kernel([torch.zeros(4, 3).t()], 1.0)


def _train(backend: str, monkeypatch) -> tuple[list[torch.Tensor], list[float]]:
    monkeypatch.setenv("SCOREFAST_BACKEND", backend)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = models.build("MLP", dim=2, hidden=32, layers=2)
    # SGD: its update scales with the clipped gradient (Adam's would not see a wrong uniform scale)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=1e-2), sde=VPSDE(), grad_clip=0.05, ema=0.9)
    x = torch.randn(48, 2, generator=torch.Generator().manual_seed(1))
    norms = []
    for _ in range(6):
        step(x)
        norms.append(float(step.last_grad_norm))
    return [p.detach().clone() for p in copy.deepcopy(model).parameters()], norms


def test_train_step_clips_with_the_kernel_on_the_cpu_backend(monkeypatch):
    """A float32 TrainStep on the cpu backend clips in one kernel call; its run stays within float32
    rounding of the same run on the torch backend (the reference's foreach clipping)."""
    calls = []
    real = clip.clip_grad_norm_ref
    monkeypatch.setattr(clip, "clip_grad_norm_ref", lambda *a: calls.append(1) or real(*a))
    fast, fast_norms = _train("cpu", monkeypatch)
    assert not calls
    ref, ref_norms = _train("torch", monkeypatch)
    assert len(calls) == 6
    assert max(norm > 0.05 for norm in ref_norms)  # the clip was active
    torch.testing.assert_close(fast_norms, ref_norms, rtol=1e-5, atol=0)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _CountingSGD(torch.optim.SGD):
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.calls = getattr(self, "calls", 0) + 1
        super().zero_grad(set_to_none)


@pytest.mark.parametrize("override", [None, "class", "instance"])
def test_train_step_zero_grad_clears_every_group_or_calls_an_override(override):
    """TrainStep sets the grads of every param group to None itself (a group added after construction
    too), unless the optimizer overrides zero_grad in its class or on the instance (apex's amp)."""
    model = models.build("MLP", dim=2, hidden=16, layers=1)
    extra = torch.nn.Parameter(torch.zeros(3))
    opt = (_CountingSGD if override == "class" else torch.optim.SGD)(model.parameters(), lr=1e-3)
    calls = []
    if override == "instance":
        opt.zero_grad = lambda set_to_none=True: calls.append(set_to_none)
    step = TrainStep(model, opt, sde=VPSDE())
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.ones(3)
    step(torch.randn(8, 2))
    if override is None:
        assert extra.grad is None and all(p.grad is None for p in model.parameters())
    elif override == "class":
        assert opt.calls == 1 and extra.grad is None
    else:
        assert calls == [True] and extra.grad is not None  # the override decides


def test_the_kernel_op_passes_opcheck():
    """The dispatched form (what torch.compile, make_fx and the capture stand-in record)."""
    grads = [g for g in _grads(4.0) if g.numel()]
    torch.library.opcheck(clip.clip_grad_norm_cpu_op, (grads, 0.5))
