"""Bad input gets a ValueError/TypeError that names the argument."""

from __future__ import annotations

import math

import pytest
import torch

import scorefast as sf

x = torch.zeros(3, 4)
s = torch.ones(3, 4)


@pytest.mark.parametrize(
    "call,exc,name",
    [
        (lambda: sf.ops.fused_update(x, [(1.0, torch.ones(3, 5))]), ValueError, "terms\\[0\\]"),
        (lambda: sf.ops.fused_update(x, [(1.0, s)] * 5), ValueError, "terms: at most 4"),
        (lambda: sf.ops.fused_update(x, [(1.0, torch.ones(2, 4))]), ValueError, "terms\\[0\\]"),
        (lambda: sf.ops.fused_update(torch.zeros(3, 4, dtype=torch.int32), []), TypeError, "x"),
        (lambda: sf.ops.fused_update(x, [(1.0, torch.ones(3, 4, dtype=torch.int64))]), TypeError, "terms\\[0\\]"),
        (lambda: sf.ops.fused_update(x, [(1.0, torch.ones(3, 4, device="meta"))]), ValueError, "terms\\[0\\]"),
        (lambda: sf.ops.fused_update(torch.tensor(1.0), []), ValueError, "x"),
        (lambda: sf.ops.fused_update(x, [s]), TypeError, "terms\\[0\\]"),
        (lambda: sf.ops.fused_update(x, [(math.nan, s)]), ValueError, "coefficient"),
        (lambda: sf.ops.fused_update(x, [(torch.ones(4), s)]), ValueError, "coefficient"),
        (lambda: sf.ops.fused_update(x, [], noise=math.inf), ValueError, "noise"),
        (lambda: sf.ops.fused_update(x, [], x_coef=torch.tensor([1.0, math.nan, 1.0])), ValueError, "x_coef"),
        (lambda: sf.ops.fused_update(x, [], out=torch.zeros(3, 5)), ValueError, "out"),
        (lambda: sf.ops.langevin_step(x, s, 0.0, seed=0, step=0), ValueError, "step_size"),
        (lambda: sf.ops.langevin_step(x, s, -1e-3, seed=0, step=0), ValueError, "step_size"),
        (lambda: sf.ops.langevin_step(x, s, math.nan, seed=0, step=0), ValueError, "step_size"),
        (lambda: sf.ops.langevin_step(x, s, torch.tensor([0.1, 0.0, 0.1]), seed=0, step=0), ValueError, "step_size"),
        (lambda: sf.ops.langevin_step(x, s, "0.1", seed=0, step=0), TypeError, "step_size"),
        (lambda: sf.ops.euler_maruyama_step(x, s, 1.0, 0.0, seed=0, step=0), ValueError, "dt"),
        (lambda: sf.ops.euler_maruyama_step(x, s, 1.0, math.inf, seed=0, step=0), ValueError, "dt"),
        (lambda: sf.ops.euler_maruyama_step(x, s, math.nan, 0.1, seed=0, step=0), ValueError, "diffusion"),
        (lambda: sf.ops.snr_langevin_step(x, s, 0.16, norm="layer", seed=0, step=0), ValueError, "norm"),
        (lambda: sf.ops.snr_langevin_step(x, s, -0.16, seed=0, step=0), ValueError, "snr"),
        (lambda: sf.ops.snr_langevin_step(x, torch.ones(3, 2), 0.16, seed=0, step=0), ValueError, "score"),
        (lambda: sf.randn((3, 4), seed=0, sample_ids=torch.arange(2)), ValueError, "sample_ids"),
        (lambda: sf.randn((3, 4), seed=0, sample_ids=torch.tensor([0, 1, 2**32])), ValueError, "sample_ids"),
        (lambda: sf.randn((3, 4), seed=0, sample_ids=torch.tensor([0, -1, 2])), ValueError, "sample_ids"),
        (lambda: sf.randn((3, 4), seed=0, sample_ids=torch.zeros(3)), TypeError, "sample_ids"),
        (lambda: sf.randn((3, 4), seed=-1), ValueError, "seed"),
        (lambda: sf.randn((3, 4), seed=2**64), ValueError, "seed"),
        (lambda: sf.randn((3, 4), seed=1.5), TypeError, "seed"),
        (lambda: sf.randn((3, 4), seed=torch.tensor(1, dtype=torch.int32)), TypeError, "seed"),
        (lambda: sf.randn((3, 4), seed=0, step=2**32), ValueError, "step"),
        (lambda: sf.randn((3, 4), seed=0, step=-1), ValueError, "step"),
        (lambda: sf.randn((3, 4), seed=0, step=torch.tensor(2**32)), ValueError, "step"),
        (lambda: sf.randn((3, 4), seed=0, stream=-2), ValueError, "stream"),
        (lambda: sf.randn((), seed=0), ValueError, "shape"),
        (lambda: sf.randn((3, 4), seed=0, dtype=torch.int64), TypeError, "dtype"),
        (lambda: sf.ops.noise((3, 4), kind="cauchy", seed=0), ValueError, "kind"),
        (lambda: sf.randn((3, 4), seed=0, backend="opencl"), ValueError, "backend"),
    ],
)
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


def test_forced_backend_that_cannot_run_is_an_error_not_a_fallback(monkeypatch):
    with pytest.raises(sf.BackendUnavailableError, match="cuda"):
        sf.randn((2, 3), seed=0, backend="cuda")
    monkeypatch.setenv("SCOREFAST_BACKEND", "cuda")
    with pytest.raises(sf.BackendUnavailableError, match="cuda"):
        sf.randn((2, 3), seed=0)


# -- kernel entries: a tensor on another device, of another shape or dtype never reaches a kernel --
meta = torch.ones(3, 4, device="meta")


def _fake_cuda(shape=(3, 4)):
    """A tensor that says it lives on cuda:0 (FakeTensorMode: no GPU needed, no memory behind it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        return torch.ones(shape, device="cuda")


def _trusted_apply(term):
    from scorefast.ops.fused_update import apply

    ids = torch.arange(3)
    return apply(x, [(0.5, term)], noise=0.1, seed=0, step=0, stream=0, sample_ids=ids, x_coef=1.0, out=None,
                 backend="cpu", trusted=True)  # fmt: skip


def _op(term=s, coefs=None, ids=None):
    from scorefast.ops.fused_update import fused_update_op

    coefs = torch.ones(3, 1) if coefs is None else coefs
    ids = torch.arange(3) if ids is None else ids
    return fused_update_op(x, [term], coefs, torch.tensor(0), torch.tensor(0), 0, ids, True, "cpu")


def _sumsq_op(t, ids):
    from scorefast.ops.sample_norm import sumsq_norms_op

    return sumsq_norms_op(t, ids, torch.tensor(0), torch.tensor(0), 4, 0, True, torch.float32, "cpu")


def _noise_and_term_norms(t, trusted=False):
    from scorefast.ops.sample_norm import noise_and_term_norms

    ids = torch.arange(3)
    return noise_and_term_norms(t, x, seed=0, step=0, stream=0, sample_ids=ids, backend="cpu", trusted=trusted)


@pytest.mark.parametrize(
    "call,exc,name",
    [
        (lambda: _trusted_apply(meta), ValueError, "terms\\[0\\]: on meta"),
        (lambda: _trusted_apply(torch.ones(3, 5)), ValueError, "terms\\[0\\]: shape"),
        (lambda: _trusted_apply(torch.ones(3, 4, dtype=torch.int32)), TypeError, "terms\\[0\\]"),
        (lambda: _trusted_apply(torch.ones(3, 4, dtype=torch.float64)), TypeError, "terms\\[0\\]"),
        (lambda: _trusted_apply(_fake_cuda()), ValueError, "terms\\[0\\]: on cuda"),
        (lambda: sf.ops.fused_update(x, [(1.0, _fake_cuda())]), ValueError, "terms\\[0\\]: on cuda"),
        (lambda: _op(meta), ValueError, "terms\\[0\\] is on meta"),
        (lambda: _op(coefs=torch.ones(3, 1, device="meta")), ValueError, "coefs is on meta"),
        (lambda: _op(ids=torch.arange(2)), ValueError, "sample_ids"),
        (lambda: _op(ids=torch.arange(3, dtype=torch.int32)), ValueError, "sample_ids"),
        (lambda: _sumsq_op(torch.ones(3, 4, device="meta"), torch.arange(3)), ValueError, "t is on meta"),
        (lambda: _sumsq_op(torch.ones(3, 5), torch.arange(3)), ValueError, "sumsq_norms: t must be"),
        (lambda: _noise_and_term_norms(meta), ValueError, "t: on meta"),
        (lambda: _noise_and_term_norms(meta, trusted=True), ValueError, "t: on meta"),
        (lambda: _noise_and_term_norms(torch.ones(3, 4, dtype=torch.int64)), TypeError, "t:"),
        (lambda: sf.ops.snr_langevin_step(x, meta, 0.16, seed=0, step=0), ValueError, "score: on meta"),
        (lambda: sf.ops.snr_langevin_step(x, meta, 0.16, seed=0, step=0, _trusted=True), ValueError, "score"),
        (lambda: sf.ops.snr_langevin_step(x, _fake_cuda(), 0.16, seed=0, step=0), ValueError, "score: on cuda"),
        (lambda: sf.ops.langevin_step(x, meta, 0.1, seed=0, step=0), ValueError, "score: on meta"),
        (lambda: sf.ops.langevin_step(x, torch.ones(3, 2), 0.1, seed=0, step=0), ValueError, "score: shape"),
        (lambda: sf.ops.euler_maruyama_step(x, meta, 1.0, 0.1, seed=0, step=0), ValueError, "drift: on meta"),
        (lambda: sf.ops.fused_update(x, [], return_norms=True, sample_ids=meta[:, 0].long()), ValueError, "sample_ids"),
        (lambda: sf.randn((3, 4), seed=0, sample_ids=torch.arange(3, device="meta")), ValueError, "sample_ids"),
    ],
)
def test_kernel_entries_refuse_foreign_tensors(call, exc, name):
    """Before: a meta term segfaulted the samplers' fast path, the trusted snr path and the norms; a
    direct op call with a meta term returned an uninitialised tensor; short ids were read past their end."""
    with pytest.raises(exc, match=name):
        call()


def test_empty_batch_through_the_ops():
    """B = 0 (before: reshape of 0 elements to [0, -1] failed inside the op)."""
    e = torch.empty(0, 4)
    assert sf.ops.fused_update(e, [(0.5, e)], noise=1.0).shape == (0, 4)
    assert sf.ops.langevin_step(e, e, 0.1, seed=0, step=0).shape == (0, 4)
    assert sf.ops.sample_norm(e).shape == (0,)


SEGFAULT_SCRIPT = """
import torch, scorefast as sf
from scorefast.sde import VPSDE, VESDE
for name, sde in [("pc", VESDE(0.01, 10)), ("ode_euler", VPSDE()), ("ddim", VPSDE()), ("euler_maruyama", VPSDE()),
                  ("reverse_diffusion", VPSDE()), ("ancestral", VPSDE()), ("heun", VPSDE()), ("langevin", VPSDE()),
                  ("annealed_langevin", VESDE(0.01, 10)), ("dpm_solver++", VPSDE()), ("rk45", VPSDE())]:
    for device in ("meta",):
        try:
            sf.sample(lambda x, t: torch.zeros(x.shape, device=device), sde, (4, 2), sampler=name, steps=3)
        except ValueError as err:
            assert str(err).startswith("score_fn: on meta, but the state x is on cpu"), err
        else:
            raise SystemExit(f"{name}: a meta score was accepted")
print("ok")
"""


def test_a_score_on_another_device_is_a_named_error_not_a_segfault():
    """Run in a subprocess: before, pc, ode_euler, ddim and euler_maruyama died with SIGSEGV."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", SEGFAULT_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


@pytest.mark.parametrize(
    "shape,exc", [((2.5, 4), TypeError), ((3, True), TypeError), ((-1, 4), ValueError), (None, TypeError)]
)
def test_noise_shape_is_never_truncated(shape, exc):
    """Same class as sf.sample's shape (issue 18 item 11): int() truncated 2.5 to 2 and True to 1."""
    with pytest.raises(exc, match="shape"):
        sf.randn(shape, seed=0)


def test_cuda_device_without_cuda_is_a_named_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="device"):
        sf.sample(lambda x, t: -x, sf.sde.VPSDE(), (2, 2), sampler="ddim", steps=3, device="cuda")


@pytest.mark.parametrize("steps", [5_000_000_000, (1 << 24) + 1, (1 << 31)])
def test_steps_beyond_what_a_run_holds_are_refused_before_any_allocation(steps):
    """steps x draws must stay below the noise counter's 2**32, and the grid small: the old code built a
    40 GB float64 grid for steps=5e9 before any check."""
    gm = sf.testing.GaussianMixture.ring(4, 3.0, 0.3)
    sde = sf.sde.VPSDE()
    calls = []
    with pytest.raises(ValueError, match=r"^steps: .* more than a run can hold"):
        sf.sample(lambda x, t: calls.append(1) or gm.score_fn(sde)(x, t), sde, (2, 2), sampler="pc", steps=steps)
    assert not calls
