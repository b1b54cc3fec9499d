"""GPU micro-benchmarks (run on a lent GPU: `scorefast bench --suite gpu`): fused ops on the cuda and
triton backends vs eager, torch.compile and a same-bytes copy, at and above 2e7 fp32 elements."""

from __future__ import annotations

import pytest
import torch

from bench import _micro
from bench.conftest import QUICK

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SIZES = [1_000_000] if QUICK else [1_000_000, 20_000_000, 100_000_000]
COMPILE_SIZES = frozenset({1_000_000} if QUICK else {20_000_000, 100_000_000})
BASELINE_ROLES = ("copy", "eager", "compile")


def _run(record, kind, size, role, backend):
    group = _micro.cases(kind, size, "cuda", backend, COMPILE_SIZES)
    if role not in group:
        pytest.skip(f"no {role} case for {kind} {size}")
    name, fn, nbytes = group[role]

    def timed():
        fn()
        torch.cuda.synchronize()

    numel = nbytes // 12 if kind == "ema" else size[0] * (size[1] if len(size) > 1 else 1)  # EMA: parameters
    record(
        timed,
        name=name,
        backend="torch" if role in BASELINE_ROLES else backend,
        dtype=torch.float32,
        size=numel,
        group=f"{kind}-{backend}-{'x'.join(map(str, size))}",
        role=role,
        bytes=nbytes,
    )


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("role", ["copy", "eager", "compile", "fused", "fused_out"])
@pytest.mark.parametrize("n", SIZES)
def test_fused_update(record, n, role, backend):
    _run(record, "fused_update", (n,), role, backend)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("role", ["eager", "fused"])
@pytest.mark.parametrize("B,D", [(64, 3 * 32 * 32), (1024, 3 * 64 * 64)])
def test_snr_corrector(record, B, D, role, backend):
    _run(record, "snr", (B, D), role, backend)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("role", ["eager", "fused_out"])
@pytest.mark.parametrize("n", [20_000_000])
def test_randn(record, n, role, backend):
    _run(record, "randn", (n,), role, backend)


@pytest.mark.parametrize("role", ["eager", "fused"])
@pytest.mark.parametrize("n_params,width", [(200, 64), (50, 512)])
def test_ema(record, n_params, width, role):
    """#5's GPU goal: sf.train.EMA (foreach) >= 10x a per-parameter loop (launch-bound at 200 tensors)."""
    _run(record, "ema", (n_params, width), role, "cuda")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("role", ["eager", "compile", "fused"])
@pytest.mark.parametrize("B,D", [(64, 3 * 32 * 32), (1024, 3 * 64 * 64)])
def test_euler_maruyama_step(record, B, D, role, backend):
    _run(record, "em", (B, D), role, backend)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("role", ["eager", "compile", "fused"])
@pytest.mark.parametrize("B,D", [(64, 3 * 32 * 32), (1024, 3 * 64 * 64)])
def test_hutchinson_probes(record, B, D, role, backend):
    _run(record, "probes", (B, D), role, backend)
