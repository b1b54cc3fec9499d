"""Helpers shared by the public op wrappers: flattening to [B, D], coefficients, counters."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import _checks, backends


@dataclass
class Counter:
    """Validated noise counter of one op call (seed, step: ints or 0-d int64 tensors)."""

    seed: int | torch.Tensor
    step: int | torch.Tensor
    stream: int
    sample_ids: torch.Tensor


def counter(B: int, device: torch.device, seed, step, stream, sample_ids) -> Counter:
    return Counter(
        seed=_checks.check_counter("seed", seed, device, upper=_checks.UINT64),
        step=_checks.check_counter("step", step, device, upper=_checks.UINT32),
        stream=_checks.check_stream(stream),
        sample_ids=_checks.check_sample_ids(sample_ids, B, device),
    )


def rows(t: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> contiguous [B, D] in logical row-major order (copies only if needed; B may be 0)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:])).contiguous()


def into_rows(out: torch.Tensor, fill: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """fill(rows) on ``out`` [B, ...] seen as contiguous [B, D] rows (logical row-major order); when
    out's layout has no such view, fill a temporary and copy it back.  Returns out."""
    shape = (out.shape[0], math.prod(out.shape[1:]))
    target = out.view(shape) if out.is_contiguous() else out.new_empty(shape)
    fill(target)
    if target.data_ptr() != out.data_ptr():
        out.copy_(target.view(out.shape))
    return out


def coef_matrix(
    coefs: Sequence[float | torch.Tensor], B: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Stack scalar / 0-d / [1] / [B] coefficients into a [K, C] tensor (differentiable).

    C = 1 (one column, shared by every sample) unless some coefficient is a [B] tensor, when
    C = B and the others are broadcast to it.  Kernels read coefficient (k, b) at
    ``k * C + (b if C > 1 else 0)``.
    """
    if not any(isinstance(c, torch.Tensor) for c in coefs) and not _checks.is_capturing_or_compiling():
        # Python numbers, eagerly: one small tensor; to a GPU through pinned memory, so the copy is
        # asynchronous (a pageable one would wait for the GPU); not allowed in a CUDA-graph capture
        host = torch.tensor(coefs, dtype=dtype)
        if device.type != "cpu":
            host = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
        return host[:, None]
    per_sample = any(isinstance(c, torch.Tensor) and c.numel() > 1 for c in coefs)
    cols = B if per_sample else 1
    out = []
    for c in coefs:
        if isinstance(c, torch.Tensor):
            out.append(c.to(dtype).reshape(-1).expand(cols))
        else:
            out.append(torch.full((cols,), c, dtype=dtype, device=device))
    return torch.stack(out)


def check_term(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    _checks.check_like(name, t, x)
    if t.dtype == torch.float64 and x.dtype != torch.float64:
        raise TypeError(f"{name}: float64 term with {x.dtype} x; use float64 x (torch backend) or a lower precision")


_LOW = frozenset((torch.float32, torch.float16, torch.bfloat16))
_TERM_DTYPES = {torch.float64: frozenset(_checks.FLOAT_DTYPES), **dict.fromkeys(_LOW, _LOW)}  # x dtype -> terms


def check_terms(terms: Sequence[tuple[object, torch.Tensor]], x: torch.Tensor) -> None:
    """The trusted (sampler) entry's one cheap check of what a kernel reads beside x: every term is a
    float tensor of x's shape on x's device (attribute compares, about 1 us a term; names are
    formatted on failure only)."""
    shape, on_cpu = x.shape, x.is_cpu
    dtypes = _TERM_DTYPES.get(x.dtype, frozenset())
    for i, (_, t) in enumerate(terms):
        if (
            type(t) is not torch.Tensor
            or t.dtype not in dtypes
            or (not t.is_cpu if on_cpu else t.device != x.device)
            or t.shape != shape
        ):
            check_term(f"terms[{i}]", t, x)  # raises, naming the term (a Tensor subclass passes)


def check_devices(op: str, device: torch.device, **tensors: torch.Tensor | Sequence[torch.Tensor] | None) -> None:
    """Kernel entry guard: every tensor a backend kernel reads or writes lives on ``device`` (a kernel
    given another device's pointer reads foreign memory: a crash, or silently wrong numbers)."""
    for name, t in tensors.items():
        for i, v in enumerate(t if isinstance(t, list | tuple) else (t,)):
            if v is not None and v.device != device:
                where = f"{name}[{i}]" if isinstance(t, list | tuple) else name
                raise ValueError(f"{op}: {where} is on {v.device}, but the op runs on {device}")


def check_ids(op: str, sample_ids: torch.Tensor, B: int) -> None:
    """Kernel entry guard: one contiguous int64 id per row (a kernel reads ids[b] for every b < B)."""
    if sample_ids.dtype != torch.int64 or sample_ids.shape != (B,) or not sample_ids.is_contiguous():
        raise ValueError(
            f"{op}: sample_ids must be contiguous int64 [{B}], got {sample_ids.dtype} {tuple(sample_ids.shape)}"
        )


def resolve_backend(backend: str | None, x: torch.Tensor) -> str:
    return backends.resolve(backend, x.device, x.dtype)


def refuse_grad(op: str, *tensors: torch.Tensor | None) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError(f"{op}: out= does not support inputs that require grad; use the functional form")
