"""Argument checks shared by the public API: every error names the argument it is about."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping, Sequence

import torch

UINT32 = 1 << 32
UINT64 = 1 << 64
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # precision= -> autocast dtype


def state_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype state and adapter arithmetic run in: float64 for float64 references, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


CAPTURE: list[str | None] = [None]  # "cuda" or "fx" while scorefast.graphs captures a step
RECORDING: list[bool] = [False]  # the CPU capture stand-in (graphs.emulated()) is recording dispatched ops


def is_capturing_or_compiling() -> bool:
    """True inside torch.compile tracing or CUDA-graph capture: no host reads allowed there."""
    if torch.compiler.is_compiling() or CAPTURE[0] is not None:
        return True
    return _cuda_available() and torch.cuda.is_current_stream_capturing()


@functools.cache
def _cuda_available() -> bool:
    """torch.cuda.is_available(), asked once (on first use, never at import)."""
    return torch.cuda.is_available()


def same_device(a: torch.device, b: torch.device) -> bool:
    """a and b are one device (``cuda`` without an index means the current one)."""
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


def check_shape(name: str, shape: object) -> tuple[int, ...]:
    """A shape: a sequence of non-negative ints (numpy ints and torch.Size too; not bools or floats,
    which ``int()`` would silently truncate)."""
    if isinstance(shape, str | bytes) or not isinstance(shape, Sequence):
        raise TypeError(f"{name}: expected a sequence of ints, got {type(shape).__name__} {shape!r}")
    for i, size in enumerate(shape):
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise TypeError(f"{name}: expected ints, got {type(size).__name__} {size!r} at position {i} of {shape!r}")
    dims = tuple(int(size) for size in shape)
    if any(size < 0 for size in dims):
        raise ValueError(f"{name}: sizes must be >= 0, got {dims}")
    return dims


def check_float_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float32/float16/bfloat16/float64 tensor, got {t.dtype}")
    return t


def check_batched(name: str, t: torch.Tensor) -> int:
    if t.dim() < 1:
        raise ValueError(f"{name}: expected a batched tensor [B, ...], got a 0-d tensor")
    return t.shape[0]


def check_finite_scalar(name: str, v: object, *, positive: bool = False, nonzero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name}: must be > 0, got {v}")
    if nonzero and v == 0:
        raise ValueError(f"{name}: must be nonzero, got {v}")
    return v


def check_real(
    name: str, v: object, *, lo: float | None = None, hi: float | None = None, allow_inf: bool = False
) -> float:
    """A real Python number (numpy scalars too; not bool) in [lo, hi], finite unless ``allow_inf``."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
    v = float(v)
    if math.isnan(v) or (not allow_inf and math.isinf(v)):
        raise ValueError(f"{name}: must be {'a number' if allow_inf else 'finite'}, got {v}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ValueError(f"{name}: must lie in {bounds}, got {v}")
    return v


def check_int(name: str, v: object, *, minimum: int | None = None) -> int:
    """A Python or numpy integer (not bool, not a float such as 2.0) >= ``minimum``."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__} {v!r}")
    v = int(v)
    if minimum is not None and v < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {v}")
    return v


def check_bool(name: str, v: object) -> bool:
    """True or False (or a numpy bool): a string such as "no" is not a bool."""
    if isinstance(v, bool) or (type(v).__module__ == "numpy" and type(v).__name__ in ("bool", "bool_")):
        return bool(v)
    raise TypeError(f"{name}: expected True or False, got {type(v).__name__} {v!r}")


def check_choice(name: str, v: object, choices: tuple) -> object:
    """One of ``choices`` (compared by equality, so an unhashable value is an error, not a crash)."""
    if not any(type(v) is type(c) and v == c for c in choices):
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {v!r}")
    return v


def check_like(name: str, t: object, x: torch.Tensor, *, other: str = "x") -> torch.Tensor:
    """A float tensor that a kernel reads beside ``x``: its shape, on its device (cheap attribute checks;
    a kernel handed a tensor on another device or of another shape would read foreign memory)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor shaped like {other} {tuple(x.shape)}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:  # int, bool, complex: a bug that a silent cast would hide
        raise TypeError(f"{name}: expected a float32/float16/bfloat16/float64 tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name}: on {t.device}, but {other} is on {x.device}")
    if t.shape != x.shape:
        raise ValueError(f"{name}: shape {tuple(t.shape)} does not match {other} {tuple(x.shape)}")
    return t


def check_coef(
    name: str, v: object, B: int, device: torch.device, *, positive: bool = False, nonzero: bool = False
) -> float | torch.Tensor:
    """A coefficient: a finite Python number, or a float tensor of shape [], [1] or [B] on ``device``.

    Tensor values are not read on the host (that would sync); Python numbers are checked.
    """
    if isinstance(v, torch.Tensor):
        if not v.is_floating_point():
            raise TypeError(f"{name}: expected a float tensor, got {v.dtype}")
        if v.device != device:
            raise ValueError(f"{name}: on {v.device}, but x is on {device}")
        if v.dim() > 1 or (v.dim() == 1 and v.shape[0] not in (1, B)):
            raise ValueError(f"{name}: expected a scalar or a [B]={B} tensor, got shape {tuple(v.shape)}")
        if v.device.type == "cpu" and not is_capturing_or_compiling():
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"{name}: contains non-finite values")
            if positive and not bool((v > 0).all()):
                raise ValueError(f"{name}: must be > 0 everywhere")
            if nonzero and not bool((v != 0).all()):
                raise ValueError(f"{name}: must be nonzero everywhere")
        return v
    return check_finite_scalar(name, v, positive=positive, nonzero=nonzero)


def check_counter(name: str, v: object, device: torch.device, *, upper: int) -> int | torch.Tensor:
    """Seed (upper=2**64) or step (upper=2**32): a Python int or a 0-d int64 tensor.

    Returns a Python int (a seed in [2**63, 2**64) becomes its int64 two's complement) or the 0-d
    int64 tensor itself: on ``device`` its value stays on the device, so CUDA-graph replays advance it.
    """
    if isinstance(v, torch.Tensor):
        if v.dtype != torch.int64 or v.dim() != 0:
            raise TypeError(f"{name}: a tensor {name} must be a 0-d int64 tensor, got {v.dtype} {tuple(v.shape)}")
        if v.device.type != "cpu" and v.device != device:
            raise ValueError(f"{name}: on {v.device}, but the op runs on {device}")
        if v.device.type == "cpu" and upper == UINT32 and not 0 <= int(v) < UINT32:
            raise ValueError(f"{name}: must lie in [0, 2**32), got {int(v)}")
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected an int or a 0-d int64 tensor, got {type(v).__name__}")
    v = int(v)
    if not 0 <= v < upper:
        bound = "2**64" if upper == UINT64 else "2**32"
        raise ValueError(f"{name}: must lie in [0, {bound}), got {v}")
    return v - UINT64 if v >= 1 << 63 else v


def counter_tensor(v: int | torch.Tensor) -> torch.Tensor:
    """A checked counter as the 0-d int64 tensor the custom ops take."""
    return v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.int64)


def use_custom_op(*tensors: torch.Tensor | None) -> bool:
    """Go through the torch.library op when tracing (torch.compile) or when autograd must record it;
    plain eager calls with no grad go straight to the backend kernel (same result, less overhead).
    A make_fx trace (``CAPTURE[0] == "fx"``) and the CPU capture stand-in (``RECORDING``) see only
    dispatched ops, so scorefast's kernels go through their torch.library ops there too."""
    if torch.compiler.is_compiling() or CAPTURE[0] == "fx" or RECORDING[0]:
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_stream(stream: object) -> int:
    if isinstance(stream, bool) or not isinstance(stream, numbers.Integral) or not 0 <= int(stream) < UINT32:
        raise ValueError(f"stream: must be an int in [0, 2**32), got {stream!r}")
    return int(stream)


def check_sample_ids(sample_ids: object, B: int, device: torch.device) -> torch.Tensor:
    """int64 [B] ids on ``device`` in [0, 2**32); default arange(B).  Checked on the host unless capturing.

    Ids on ``device`` are used as they are and host (CPU) ids are copied to it; ids on any other
    device are a ValueError."""
    if sample_ids is None:
        if B > UINT32:
            raise ValueError(f"sample_ids: batch {B} exceeds 2**32 ids")
        return torch.arange(B, dtype=torch.int64, device=device)
    if not isinstance(sample_ids, torch.Tensor):
        sample_ids = torch.as_tensor(sample_ids)
    if sample_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"sample_ids: expected an int64 tensor, got {sample_ids.dtype}")
    if sample_ids.dim() != 1 or sample_ids.shape[0] != B:
        raise ValueError(f"sample_ids: expected shape [{B}] (one id per sample), got {tuple(sample_ids.shape)}")
    if sample_ids.device.type != "cpu" and not same_device(sample_ids.device, device):  # host ids: copied
        raise ValueError(f"sample_ids: on {sample_ids.device}, but the op runs on {device}")
    if sample_ids.device.type == "meta":
        raise ValueError("sample_ids: a meta tensor holds no ids")
    sample_ids = sample_ids.to(device=device, dtype=torch.int64)
    if B and not is_capturing_or_compiling():
        lo, hi = int(sample_ids.min()), int(sample_ids.max())
        if lo < 0 or hi >= UINT32:
            raise ValueError(f"sample_ids: must lie in [0, 2**32), got values in [{lo}, {hi}]")
    return sample_ids.contiguous()


def check_extra_args(extra_args, B: int) -> dict:
    """score_fn's keyword arguments: a dict with str keys; a tensor of dim >= 1 is per sample ([B, ...])."""
    if extra_args is not None and not isinstance(extra_args, Mapping):
        raise TypeError(
            f"extra_args: expected a dict of keyword arguments for score_fn, got {type(extra_args).__name__}"
        )
    extra = dict(extra_args or {})
    for key, value in extra.items():
        if not isinstance(key, str):
            raise TypeError(f"extra_args: keys are score_fn's keyword names (str), got {key!r}")
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] != B:
            raise ValueError(f"extra_args[{key!r}]: batch {value.shape[0]} does not match {B} samples")
    return extra
