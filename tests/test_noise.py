"""Properties of sf.randn / rand / rademacher: ids, shapes, dtypes, layouts, invariance, statistics."""

from __future__ import annotations

import math

import pytest
import torch

import scorefast as sf
from tests.conftest import INTERPRETED, backend_params

BACKENDS = backend_params()


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_invariance_bitwise(backend):
    """Sample i's noise is bitwise the same at B = 1, 7 and 1000, wherever it sits in the batch."""
    D = 37
    big = sf.randn((1000, D), seed=11, step=3, backend=backend)
    for ids in ([513], [4, 999, 0, 513, 17, 250, 3]):
        small = sf.randn((len(ids), D), seed=11, step=3, sample_ids=torch.tensor(ids), backend=backend)
        assert torch.equal(small, big[ids])


@pytest.mark.parametrize("backend", BACKENDS)
def test_shape_is_logical_row_major(backend):
    flat = sf.randn((3, 60), seed=5, backend=backend)
    shaped = sf.randn((3, 3, 4, 5), seed=5, backend=backend)
    assert torch.equal(shaped.reshape(3, -1), flat)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_output_dtypes(backend, dtype):
    if dtype == torch.float64 and backend != "torch":
        with pytest.raises(sf.BackendUnavailableError, match="float64"):
            sf.randn((2, 9), seed=1, dtype=dtype, backend=backend)
        return
    out = sf.randn((2, 9), seed=1, dtype=dtype, backend=backend)
    ref = sf.randn((2, 9), seed=1, dtype=torch.float64, backend="torch")
    assert out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float64: 0.0}.get(dtype, 2.0**-7 * 5)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol if dtype in (torch.float16, torch.bfloat16) else 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_noncontiguous_and_channels_last(backend):
    ref = sf.randn((2, 3, 4, 5), seed=9, step=1, backend=backend)
    out = torch.empty(2, 4, 5, 3).permute(0, 3, 1, 2)  # non-contiguous [2, 3, 4, 5]
    got = sf.randn(out.shape, seed=9, step=1, out=out, backend=backend)
    assert got is out and torch.equal(out, ref)
    cl = torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last)
    sf.randn(cl.shape, seed=9, step=1, out=cl, backend=backend)
    assert torch.equal(cl, ref) and cl.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_counter_tensors_equal_ints(backend):
    a = sf.randn((3, 10), seed=2**63 + 5, step=7, backend=backend)
    seed_t = torch.tensor(2**63 + 5 - 2**64, dtype=torch.int64)  # two's complement of a 64-bit seed
    b = sf.randn((3, 10), seed=seed_t, step=torch.tensor(7), backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_large_size_matches_reference(backend):
    n = 100_003
    got = sf.randn((1, n), seed=4, step=2, stream=3, backend=backend)
    ref = sf.randn((1, n), seed=4, step=2, stream=3, dtype=torch.float64, backend="torch")
    assert (got.double() - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["normal", "uniform", "rademacher"])
@pytest.mark.parametrize("D", [1, 2, 3, 4, 5, 1025])
@pytest.mark.parametrize("elem_offset", [0, 1, 2, 6])
def test_every_row_layout_matches_reference(backend, kind, D, elem_offset):
    """Rows of any length, starting on a Philox group or inside one: the cpu kernel has whole-group,
    first-pair-only (rows of <= 2 elements) and element-wise paths; each gives the contract's values
    (words exactly, normals within 1e-5 of the float64 reference)."""
    from scorefast.ops.noise import noise

    ids = torch.tensor([0, 5, 2**32 - 1, 77, 3, 1 << 20] * 50)
    args = dict(kind=kind, seed=2**40 + 3, step=9, stream=2, sample_ids=ids, elem_offset=elem_offset)
    got = noise((len(ids), D), backend=backend, **args)
    ref = noise((len(ids), D), dtype=torch.float64, backend="torch", **args)
    assert (got.double() - ref).abs().max() <= (1e-5 if kind == "normal" else 0.0)


def test_distinct_counters_give_distinct_noise():
    base = dict(seed=1, step=0, stream=0)
    a = sf.randn((4, 64), **base)
    for change in ({"seed": 2}, {"step": 1}, {"stream": 1}):
        b = sf.randn((4, 64), **{**base, **change})
        assert not torch.isclose(a, b).any(), change
    shifted = sf.randn((4, 64), sample_ids=torch.arange(1, 5), **base)
    assert torch.equal(shifted[:3], a[1:])


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.skipif(INTERPRETED, reason="statistics run on the compiled backends")
@pytest.mark.parametrize("backend", backend_params(include_torch=False))
def test_statistics(backend):
    from scipy import stats

    B, D = 256, 4096  # 2**20 normals
    z = sf.randn((B, D), seed=123, step=4, backend=backend).double()
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    assert stats.kstest(z.flatten().numpy(), "norm").pvalue > 1e-3
    # skewness and kurtosis of a normal: 0 and 3
    assert abs(float((z**3).mean())) < 5 * math.sqrt(15 / n)
    assert abs(float((z**4).mean()) - 3) < 5 * math.sqrt(96 / n)
    bound = 5 / math.sqrt(n / 2)
    assert abs(_corr(z[:, 0::2], z[:, 1::2])) < bound  # Box-Muller partners
    assert abs(_corr(z[:, :-1], z[:, 1:])) < 2 * bound  # neighbours (incl. across groups)
    assert abs(_corr(z[:-1], z[1:])) < 2 * bound  # neighbouring samples
    z_step = sf.randn((B, D), seed=123, step=5, backend=backend).double()
    z_stream = sf.randn((B, D), seed=123, step=4, stream=1, backend=backend).double()
    assert abs(_corr(z, z_step)) < 2 * bound
    assert abs(_corr(z, z_stream)) < 2 * bound
    u = sf.rand((B, D), seed=7, backend=backend).double()
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert stats.kstest(u.flatten().numpy(), "uniform").pvalue > 1e-3
    r = sf.rademacher((B, D), seed=7, backend=backend)
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(r.double().mean())) < 5 / math.sqrt(n)


def test_rademacher_defaults_to_probe_stream():
    assert torch.equal(sf.rademacher((2, 8), seed=3), sf.ops.noise((2, 8), kind="rademacher", seed=3, stream=1))
