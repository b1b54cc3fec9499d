"""CPU micro-benchmarks (this machine: 2 threads): fused ops vs eager vs torch.compile vs copy."""

from __future__ import annotations

import pytest
import torch

from bench import _micro
from bench.conftest import QUICK

SIZES = [100_000] if QUICK else [100_000, 1_000_000, 10_000_000, 100_000_000]
COMPILE_SIZES = frozenset({100_000} if QUICK else {1_000_000, 10_000_000})
BASELINE_ROLES = ("copy", "eager", "compile")


def _run(record, kind, size, role, dtype=torch.float32):
    group = _micro.cases(kind, size, "cpu", "cpu", COMPILE_SIZES)
    if role not in group:
        pytest.skip(f"no {role} case for {kind} {size}")
    name, fn, nbytes = group[role]
    numel = nbytes // 12 if kind == "ema" else size[0] * (size[1] if len(size) > 1 else 1)  # EMA: parameters
    rounds = 5 if numel >= 50_000_000 else None
    record(
        fn,
        name=name,
        backend="torch" if role in BASELINE_ROLES else "cpu",
        dtype=dtype,
        size=numel,
        group=f"{kind}-{'x'.join(map(str, size))}",
        role=role,
        bytes=nbytes,
        rounds=rounds,
    )


@pytest.mark.parametrize("role", ["copy", "eager", "compile", "fused", "fused_out"])
@pytest.mark.parametrize("n", SIZES)
def test_fused_update(record, n, role):
    _run(record, "fused_update", (n,), role)


@pytest.mark.parametrize("role", ["eager", "fused"])
@pytest.mark.parametrize("B,D", [(64, 3 * 32 * 32)] if QUICK else [(64, 3 * 32 * 32), (1000, 3 * 64 * 64)])
def test_snr_corrector(record, B, D, role):
    _run(record, "snr", (B, D), role)


@pytest.mark.parametrize("role", ["eager", "fused_out"])
@pytest.mark.parametrize("n", [1_000_000] if QUICK else [1_000_000, 10_000_000])
def test_randn(record, n, role):
    _run(record, "randn", (n,), role)


@pytest.mark.parametrize("role", ["eager", "fused"])
@pytest.mark.parametrize("n_params,width", [(200, 64)] if QUICK else [(200, 64), (50, 512)])
def test_ema(record, n_params, width, role):
    _run(record, "ema", (n_params, width), role)


@pytest.mark.parametrize("role", ["eager", "compile", "fused"])
@pytest.mark.parametrize("B,D", [(64, 3 * 32 * 32)] if QUICK else [(64, 3 * 32 * 32), (1000, 3 * 64 * 64)])
def test_euler_maruyama_step(record, B, D, role):
    _run(record, "em", (B, D), role)


@pytest.mark.parametrize("role", ["eager", "compile", "fused"])
@pytest.mark.parametrize("B,D", [(64, 3 * 32 * 32)] if QUICK else [(64, 3 * 32 * 32), (1000, 3 * 64 * 64)])
def test_hutchinson_probes(record, B, D, role):
    _run(record, "probes", (B, D), role)
