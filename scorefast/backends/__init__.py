"""Backend registry: which implementation runs an op, and why the others are not available.

Four implementations of every op (DESIGN.md): ``torch`` (readable reference, float64-capable),
``cpu`` (C++, ``scorefast._C_<isa>``), ``triton`` (``scorefast.kernels``) and ``cuda``
(``scorefast._cuda``).  Nothing is loaded and no GPU is queried until an op needs a backend.

Each backend module exposes ``fill_noise``, ``fused_update``, ``sumsq_norms`` and
``snr_langevin_step`` on 2-D contiguous [B, D] tensors, with seed/step as ints or 0-d int64 tensors
(see ``torch_backend``, the reference).  ``fused_update`` and ``snr_langevin_step`` also take the
step ops' keywords: ``row`` (read a coefficient table at that device step counter), ``draws`` /
``draw`` (Philox step ``step * draws + draw``) and ``flag`` (set to ``step`` on a non-finite write);
sample ids may be None (arange(B), made in-kernel).  GPU launches run under ``launch_device``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch

NAMES = ("torch", "cpu", "triton", "cuda")
REQUIRABLE = (*NAMES, "cuda_module")
_MODULES = {"torch": "torch_backend", "cpu": "cpu_backend", "triton": "triton_backend", "cuda": "cuda_backend"}


class BackendUnavailableError(RuntimeError):
    """A backend was forced (``backend=``, ``SCOREFAST_BACKEND``) or required but cannot run."""


@dataclass(frozen=True)
class BackendState:
    name: str
    available: bool
    why: str  # what it runs on when available, the reason when not
    devices: tuple[str, ...] = ()


_states: dict[str, BackendState] = {}


@functools.cache
def _load(name: str) -> ModuleType:
    """The backend's Python module (cached: ops ask for it on every call)."""
    return importlib.import_module(f"{__name__}.{_MODULES[name]}")


def state(name: str) -> BackendState:
    """Availability of backend ``name`` (loads it on first call; cached)."""
    if name not in NAMES:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {', '.join(NAMES)}")
    if name not in _states:
        try:
            module = _load(name)
            ok, why, devices = module.availability()
        except Exception as err:  # an import error of an optional dependency is a reason, not a crash
            ok, why, devices = False, f"{type(err).__name__}: {err}", ()
        _states[name] = BackendState(name, ok, why, tuple(devices))
    return _states[name]


def get(name: str) -> ModuleType:
    st = state(name)
    if not st.available:
        raise BackendUnavailableError(f"backend {name!r} is not available: {st.why}")
    return _load(name)


def _supports(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if backend ``name`` can run on (device, dtype), else why not."""
    st = state(name)
    if not st.available:
        return st.why
    if device.type not in st.devices:
        return f"it runs on {'/'.join(st.devices)} tensors, not {device.type}"
    if name != "torch" and dtype == torch.float64:
        return "float64 runs on the torch backend only"
    return None


def resolve(backend: str | None, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The backend for tensors on ``device`` of ``dtype``.

    Explicit ``backend`` (or ``SCOREFAST_BACKEND``) wins and is an error if it cannot run there;
    otherwise CUDA tensors go to ``cuda``, else ``triton``, and CPU tensors to ``cpu``, else
    ``torch``; float64 always to ``torch``.
    """
    forced = backend or os.environ.get("SCOREFAST_BACKEND") or None
    if forced is not None:
        if forced not in NAMES:
            raise ValueError(f"backend: unknown backend {forced!r}; expected one of {', '.join(NAMES)}")
        why = _supports(forced, device, dtype)
        if why is not None:
            raise BackendUnavailableError(f"backend {forced!r} cannot run on {device.type} {dtype}: {why}")
        return forced
    order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
    for name in order:
        if _supports(name, device, dtype) is None:
            return name
    raise BackendUnavailableError(f"no backend runs on {device.type} {dtype}")


def check_required(spec: str | None = None) -> None:
    """Raise if a backend named in ``SCOREFAST_REQUIRE_BACKENDS`` (comma list) is not usable."""
    spec = os.environ.get("SCOREFAST_REQUIRE_BACKENDS", "") if spec is None else spec
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name not in REQUIRABLE:
            raise ValueError(f"SCOREFAST_REQUIRE_BACKENDS: unknown name {name!r}; expected {', '.join(REQUIRABLE)}")
        if name == "cuda_module":
            from . import cuda_backend

            ok, why = cuda_backend.module_state()
        else:
            st = state(name)
            ok, why = st.available, st.why
        if not ok:
            raise BackendUnavailableError(f"SCOREFAST_REQUIRE_BACKENDS names {name!r}, which is not available: {why}")


def launch_device(x: torch.Tensor, **others) -> contextlib.AbstractContextManager:
    """The device guard a kernel launch runs under: x's device (a null context for CPU tensors).

    Every other tensor the kernel reads or writes through a pointer (``others``, named as the caller
    knows them; None entries are skipped) must live on x's device: else a ValueError naming it.
    Launchers take the stream as ``torch.cuda.current_stream(x.device)`` inside the guard, and
    Triton takes the current device's current stream, so a launch for tensors on cuda:1 runs there
    whatever the current device was.
    """
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, but x is on {x.device}")
    if x.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(x.device)
