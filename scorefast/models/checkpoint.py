"""Model checkpoints: one safetensors file, its ``__metadata__`` JSON says how to rebuild the score.

Metadata (DESIGN.md): ``{arch, arch_kwargs, sde, sde_kwargs, parameterisation, time_map, shape,
data_range, version}``.  ``load`` rebuilds ``(score_fn, sde, shape)`` with no pickle: the weights
are safetensors, the rest is JSON, and ``arch`` / ``sde`` must name classes this package ships.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from .. import adapters
from .._io import atomic_save_file
from ..sde import EDM, SDE, VESDE, VPSDE, DiscreteVP, RectifiedFlow, SubVPSDE
from .mlp import MLP
from .unet import UNet

FORMAT_VERSION = 1
ARCHS: dict[str, type[torch.nn.Module]] = {"MLP": MLP, "UNet": UNet}
SDES: dict[str, type[SDE]] = {c.__name__: c for c in (VESDE, VPSDE, SubVPSDE, EDM, DiscreteVP, RectifiedFlow)}


def arch_kwargs(model: torch.nn.Module) -> dict:
    """The constructor arguments a shipped model was built with (recorded at construction)."""
    kwargs = getattr(model, "_arch_kwargs", None)
    if kwargs is None:
        raise ValueError(f"model: {type(model).__name__} was not built by sf.models.build, its arch_kwargs are unknown")
    return dict(kwargs)


def build(arch: str, **kwargs) -> torch.nn.Module:
    """``ARCHS[arch](**kwargs)``, remembering kwargs so the checkpoint can rebuild it."""
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {', '.join(ARCHS)}, got {arch!r}")
    model = ARCHS[arch](**kwargs)
    model._arch_kwargs = dict(kwargs)
    return model


def sde_from_config(name: str, kwargs: dict) -> SDE:
    if name not in SDES:
        raise ValueError(f"sde: expected one of {', '.join(SDES)}, got {name!r}")
    return SDES[name](**kwargs)


def save(
    path: str | os.PathLike,
    model: torch.nn.Module,
    *,
    sde: SDE,
    shape: tuple[int, ...],
    parameterisation: str = "eps",
    time_map: str = "default",
    data_range: tuple[float, float] = (-1.0, 1.0),
    extra: dict | None = None,
) -> Path:
    """Write ``model``'s weights and how to turn them into a score (atomically)."""
    if parameterisation not in adapters.PARAMETERISATIONS:
        raise ValueError(f"parameterisation: expected one of {', '.join(adapters.PARAMETERISATIONS)}")
    if not isinstance(time_map, str) or time_map not in adapters.TIME_MAPS:
        raise ValueError(f"time_map: a checkpoint records a named map, one of {', '.join(adapters.TIME_MAPS)}")
    meta = {
        "arch": type(model).__name__,
        "arch_kwargs": arch_kwargs(model),
        "sde": type(sde).__name__,
        "sde_kwargs": sde.config(),
        "parameterisation": parameterisation,
        "time_map": time_map,
        "shape": [int(s) for s in shape],
        "data_range": [float(v) for v in data_range],
        "version": FORMAT_VERSION,
        **(extra or {}),
    }
    return atomic_save_file(model.state_dict(), path, {"scorefast": json.dumps(meta)})


MAX_METADATA_CHARS = 8 << 20  # JSON metadata larger than this is refused unread (a DiscreteVP table is ~20 kB)
MAX_METADATA_DEPTH = 8  # nesting of the metadata JSON (the format itself needs 3)
MAX_SDE_N = 1_000_000  # VP / VE SDEs allocate tables of N entries


def _depth(value) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            todo.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _is_int(value, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_fields(meta: dict, path) -> None:
    """Each field of the format has the type the loader needs: a ValueError naming the field otherwise."""

    def bad(field: str, want: str):
        return ValueError(f"path: {path}: metadata field {field!r} must be {want}, got {meta.get(field)!r}"[:400])

    if not isinstance(meta.get("arch"), str) or meta["arch"] not in ARCHS:
        raise bad("arch", f"one of {', '.join(ARCHS)}")
    if not isinstance(meta.get("arch_kwargs"), dict):
        raise bad("arch_kwargs", "an object of constructor arguments")
    params = inspect.signature(ARCHS[meta["arch"]]).parameters
    for key in meta["arch_kwargs"]:
        if key not in params:
            raise ValueError(f"path: {path}: arch_kwargs: {meta['arch']} takes no argument {key!r}"[:400])
    if not isinstance(meta.get("sde"), str) or meta["sde"] not in SDES:
        raise bad("sde", f"one of {', '.join(SDES)}")
    if not isinstance(meta.get("sde_kwargs"), dict):
        raise bad("sde_kwargs", "an object of constructor arguments")
    if "N" in meta["sde_kwargs"] and not (_is_int(meta["sde_kwargs"]["N"]) and meta["sde_kwargs"]["N"] <= MAX_SDE_N):
        raise ValueError(f"path: {path}: sde_kwargs: N (the SDE's table size) must be an int in [1, {MAX_SDE_N}]")
    if meta.get("parameterisation") not in adapters.PARAMETERISATIONS:
        raise bad("parameterisation", f"one of {', '.join(adapters.PARAMETERISATIONS)}")
    if meta.get("time_map", "default") not in adapters.TIME_MAPS:
        raise bad("time_map", f"one of {', '.join(adapters.TIME_MAPS)}")
    shape = meta.get("shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 4 or not all(_is_int(s) for s in shape):
        raise bad("shape", "a list of 1 to 4 ints >= 1 (one sample's shape)")
    data_range = meta.get("data_range", [-1.0, 1.0])
    if (
        not isinstance(data_range, list)
        or len(data_range) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in data_range)
        or not data_range[0] < data_range[1]
    ):
        raise bad("data_range", "[low, high] with finite low < high")
    if not _is_int(meta.get("version", 0), 0):
        raise bad("version", "an int")


def read_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint's JSON metadata, each field checked (ValueError naming the file and the field
    if it is not a scorefast checkpoint, is damaged, or was crafted); no tensor is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("scorefast")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"path: {path} is not a readable safetensors file: {err}") from err
    if raw is None:
        raise ValueError(f"path: {path} has no scorefast metadata (not a scorefast model checkpoint)")
    if len(raw) > MAX_METADATA_CHARS:
        raise ValueError(f"path: {path}: scorefast metadata of {len(raw)} characters (at most {MAX_METADATA_CHARS})")
    try:
        meta = json.loads(raw)
    except RecursionError:
        raise ValueError(f"path: {path}: scorefast metadata nested too deeply") from None
    except ValueError as err:
        raise ValueError(f"path: {path}: scorefast metadata is not JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"path: {path}: scorefast metadata must be a JSON object, got {type(meta).__name__}")
    if _depth(meta) > MAX_METADATA_DEPTH:
        raise ValueError(f"path: {path}: scorefast metadata nested deeper than {MAX_METADATA_DEPTH} levels")
    if _is_int(meta.get("version", 0), 0) and meta.get("version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"path: {path}: checkpoint format {meta['version']} is newer than this scorefast ({FORMAT_VERSION})"
        )
    _check_fields(meta, path)
    return meta


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


class _TooManyParameters(Exception):
    pass


class _ParametersOnMeta(TorchFunctionMode):
    """Within: ``torch.empty`` without a device (how torch.nn layers allocate their parameters) makes
    meta tensors, which hold no memory; every parameter registered in this thread past ``limit``
    stops the build."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.count, self.thread = limit, 0, threading.get_ident()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.empty and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)

    def hook(self, module, name, param):
        if threading.get_ident() == self.thread:
            self.count += 1
            if self.count > self.limit:
                raise _TooManyParameters

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_parameter_registration_hook(self.hook)
        return super().__enter__()

    def __exit__(self, *exc):
        self.handle.remove()
        return super().__exit__(*exc)


def _ints(value) -> Iterator[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _ints(v)


def _check_architecture(path, meta: dict) -> None:
    """The declared architecture against the stored tensors, from the file's header alone, before
    anything is allocated: no integer argument may exceed the file's largest tensor dimension or
    tensor count, and the module, built with its parameters on the meta device and no more of them
    than the file stores, must have exactly the stored tensor names and shapes."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}
    where = f"path: {path}: arch_kwargs {json.dumps(meta['arch_kwargs'])[:200]}"
    bound = max([len(stored), *(d for _, shape in stored.values() for d in shape)])
    for value in _ints(list(meta["arch_kwargs"].values())):
        if not 0 <= value <= bound:
            raise ValueError(f"{where}: {value} is not in [0, {bound}] (the file's largest dimension or tensor count)")
    try:
        with _ParametersOnMeta(2 * len(stored) + 8):  # room to name a missing tensor, still bounded
            model = build(meta["arch"], **meta["arch_kwargs"])
    except _TooManyParameters:
        raise ValueError(f"{where} declare far more parameter tensors than the file's {len(stored)}") from None
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise ValueError(f"{where} do not build a {meta['arch']}: {err}") from None
    declared = {k: list(v.shape) for k, v in model.state_dict().items()}
    for key in sorted(declared.keys() - stored.keys()):
        raise ValueError(f"{where}: tensor {key!r} is missing from the file")
    for key in sorted(stored.keys() - declared.keys()):
        raise ValueError(f"{where}: the file holds tensor {key!r}, which a {meta['arch']} does not have")
    for key, (dtype, shape) in stored.items():
        if shape != declared[key]:
            raise ValueError(f"{where}: tensor {key!r} is stored as {shape}, the architecture needs {declared[key]}")
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{where}: tensor {key!r} is stored as {dtype}, not a floating-point type")


def load_model(path: str | os.PathLike, *, device=None, trainable: bool = False) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode with the checkpoint's weights, metadata); parameters frozen unless ``trainable``.

    The declared architecture is checked against the stored tensors before anything is allocated,
    and the loaded model must map one sample of the declared ``shape`` to that shape."""
    meta = read_metadata(path)
    _check_architecture(path, meta)
    model = build(meta["arch"], **meta["arch_kwargs"])
    model.load_state_dict(load_file(str(path)))
    model = model.to(device or "cpu").eval().requires_grad_(trainable)
    param = next(model.parameters())
    x = torch.zeros((1, *meta["shape"]), device=param.device, dtype=param.dtype)
    try:
        with torch.no_grad():
            y = model(x, torch.ones(1, device=param.device))
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"path: {path}: shape {meta['shape']} does not fit the {meta['arch']}: {err}") from None
    if y.shape != x.shape:
        raise ValueError(f"path: {path}: the {meta['arch']} maps shape {meta['shape']} to {list(y.shape)[1:]}")
    return model, meta


def load(path: str | os.PathLike, *, device=None) -> tuple[Callable, SDE, tuple[int, ...]]:
    """(score_fn(x, t) with t [B] in the SDE's time, sde, sample shape) from a checkpoint (frozen weights;
    ``score_fn.net`` is the model)."""
    meta = read_metadata(path)
    try:
        sde = sde_from_config(meta["sde"], meta["sde_kwargs"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"path: {path}: sde_kwargs {json.dumps(meta['sde_kwargs'])[:200]}: {err}") from None
    model, meta = load_model(path, device=device)
    score_fn = adapters.from_parameterisation(model, sde, meta["parameterisation"], time_map=meta["time_map"])
    score_fn.metadata = meta
    return score_fn, sde, tuple(meta["shape"])
