"""``scorefast::noise``: the contract's uniforms / normals / Rademacher signs as a custom op."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _checks, backends
from ..rng import KINDS
from . import _common


def _fill(
    out: Tensor, sample_ids: Tensor, seed: Tensor, step: Tensor, stream: int, elem_offset: int, kind: int, backend: str
) -> None:
    """Fill ``out`` [B, D] (any float dtype) by ``backend``."""
    _common.check_devices("noise", out.device, sample_ids=sample_ids)
    _common.check_ids("noise", sample_ids, out.shape[0])
    impl = backends.get(backend)
    if backend == "torch":
        out.copy_(impl.noise(sample_ids, out.shape[1], seed, step, stream, elem_offset, kind, torch.float64))
    elif out.dtype == torch.float32 and out.is_contiguous():
        impl.fill_noise(out, sample_ids, seed, step, stream, elem_offset, kind)
    else:
        tmp = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        impl.fill_noise(tmp, sample_ids, seed, step, stream, elem_offset, kind)
        out.copy_(tmp)


@torch.library.custom_op("scorefast::noise", mutates_args=())
def noise_op(
    sample_ids: Tensor,
    seed: Tensor,
    step: Tensor,
    numel: int,
    stream: int,
    elem_offset: int,
    kind: int,
    dtype: torch.dtype,
    backend: str,
) -> Tensor:
    """[B, numel] noise of kind (0 uniform, 1 normal, 2 Rademacher) for elements elem_offset + e."""
    out = torch.empty(sample_ids.shape[0], numel, dtype=dtype, device=sample_ids.device)
    _fill(out, sample_ids, seed, step, stream, elem_offset, kind, backend)
    return out


@noise_op.register_fake
def _(sample_ids, seed, step, numel, stream, elem_offset, kind, dtype, backend):
    return sample_ids.new_empty((sample_ids.shape[0], numel), dtype=dtype)


@torch.library.custom_op("scorefast::noise_out", mutates_args=("out",))
def noise_out_op(
    out: Tensor, sample_ids: Tensor, seed: Tensor, step: Tensor, stream: int, elem_offset: int, kind: int, backend: str
) -> None:
    """Writes the noise into ``out`` [B, ...] (row-major element order within each sample)."""
    _common.into_rows(out, lambda rows: _fill(rows, sample_ids, seed, step, stream, elem_offset, kind, backend))


@noise_out_op.register_fake
def _(out, sample_ids, seed, step, stream, elem_offset, kind, backend):
    _common.check_devices("noise_out", out.device, sample_ids=sample_ids)
    return None


def noise(
    shape: Sequence[int],
    *,
    kind: str = "normal",
    seed,
    step=0,
    stream: int = 0,
    sample_ids: Tensor | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
    out: Tensor | None = None,
    elem_offset: int = 0,
    backend: str | None = None,
) -> Tensor:
    """Noise of the contract, shape [B, ...]; see ``scorefast.randn``."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if out is not None:
        _checks.check_float_tensor("out", out)
        if shape is not None and tuple(out.shape) != tuple(shape):
            raise ValueError(f"out: shape {tuple(out.shape)} does not match shape {tuple(shape)}")
        shape, device, dtype = tuple(out.shape), out.device, out.dtype
    shape = _checks.check_shape("shape", shape)
    if len(shape) < 1:
        raise ValueError(f"shape: expected [B, ...] with B the batch, got {shape}")
    if dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype: expected a float dtype, got {dtype}")
    if device is None:
        device = sample_ids.device if isinstance(sample_ids, Tensor) else torch.device("cpu")
    device = torch.device(device)
    elem_offset = _checks.check_int("elem_offset", elem_offset, minimum=0)
    c = _common.counter(shape[0], device, seed, step, stream, sample_ids)
    # the noise itself is fp32 on every backend; float64 output asks the reference for float64
    name = backends.resolve(backend, device, torch.float32 if dtype != torch.float64 else torch.float64)
    numel = math.prod(shape[1:])
    if not torch.compiler.is_compiling():
        target = out if out is not None else torch.empty(shape, dtype=dtype, device=device)
        return _common.into_rows(
            target, lambda rows: _fill(rows, c.sample_ids, c.seed, c.step, c.stream, elem_offset, KINDS[kind], name)
        )
    seed_t, step_t = _checks.counter_tensor(c.seed), _checks.counter_tensor(c.step)
    if out is not None:
        noise_out_op(out, c.sample_ids, seed_t, step_t, c.stream, elem_offset, KINDS[kind], name)
        return out
    flat = noise_op(c.sample_ids, seed_t, step_t, numel, c.stream, elem_offset, KINDS[kind], dtype, name)
    return flat.view(shape)
