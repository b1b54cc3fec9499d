"""GPU micro-benchmarks (run on a lent GPU: `scorefast bench --suite gpu`): fused ops on the cuda and
triton backends vs eager, torch.compile and a same-bytes copy, at and above 2e7 fp32 elements.

``SCOREFAST_BENCH_DEVICE=cpu`` runs this suite's code on small CPU tensors, with the cuda backend
under its host emulation (``SCOREFAST_CUDA_EMULATE=1``) and Triton under ``TRITON_INTERPRET=1``, and
no torch.compile rows: a smoke test of the suite, not a measurement.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench import _micro
from bench.conftest import QUICK

DEVICE = torch.device(os.environ.get("SCOREFAST_BENCH_DEVICE", "cuda"))
SMOKE = DEVICE.type != "cuda"
pytestmark = pytest.mark.skipif(not SMOKE and not torch.cuda.is_available(), reason="needs a CUDA GPU")
SIZES = ([4099] if QUICK else [100_003]) if SMOKE else [1_000_000] if QUICK else [1_000_000, 20_000_000, 100_000_000]
COMPILE_SIZES = frozenset({1_000_000} if QUICK else {20_000_000, 100_000_000})
RANDN_SIZE = 100_003 if SMOKE else 20_000_000
IMAGES = [(5, 3 * 16 * 16 if QUICK else 3 * 32 * 32)] if SMOKE else [(64, 3 * 32 * 32), (1024, 3 * 64 * 64)]  # (B, D)
BASELINE_ROLES = ("copy", "eager", "compile")


def _run(record, kind, size, role, backend):
    group = _micro.cases(kind, size, DEVICE.type, backend, COMPILE_SIZES, with_compile=not SMOKE)
    if role not in group:
        pytest.skip(f"no {role} case for {kind} {size}")
    name, fn, nbytes = group[role]

    def timed():
        fn()
        _micro.sync(DEVICE)

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
@pytest.mark.parametrize("role", ["copy", "fused_out"])
@pytest.mark.parametrize("n", SIZES[-1:])
def test_fused_update_table(record, n, role, backend):
    """The one-launch form (table row, device counter, flag): it must keep the plain op's bandwidth."""
    _run(record, "table", (n,), role, backend)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("role", ["eager", "fused"])
@pytest.mark.parametrize("B,D", IMAGES)
def test_snr_corrector(record, B, D, role, backend):
    _run(record, "snr", (B, D), role, backend)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("role", ["copy", "eager", "fused_out"])
@pytest.mark.parametrize("B,D", IMAGES)
def test_snr_corrector_one_kernel(record, B, D, role, backend):
    """norm="sample": one kernel for D <= 8192 (3 x 32 x 32 = 3072; 3 x 64 x 64 = 12288 takes three)."""
    _run(record, "snr_sample", (B, D), role, backend)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("role", ["eager", "fused_out"])
@pytest.mark.parametrize("n", [RANDN_SIZE])
def test_randn(record, n, role, backend):
    _run(record, "randn", (n,), role, backend)


@pytest.mark.parametrize("role", ["eager", "fused"])
@pytest.mark.parametrize("n_params,width", [(200, 64), (50, 512)])
def test_ema(record, n_params, width, role):
    """#5's GPU goal: sf.train.EMA (foreach) >= 10x a per-parameter loop (launch-bound at 200 tensors)."""
    _run(record, "ema", (n_params, width), role, "cuda")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("role", ["eager", "compile", "fused"])
@pytest.mark.parametrize("B,D", IMAGES)
def test_euler_maruyama_step(record, B, D, role, backend):
    _run(record, "em", (B, D), role, backend)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("role", ["eager", "compile", "fused"])
@pytest.mark.parametrize("B,D", IMAGES)
def test_hutchinson_probes(record, B, D, role, backend):
    _run(record, "probes", (B, D), role, backend)
