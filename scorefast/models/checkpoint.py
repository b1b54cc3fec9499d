"""Model checkpoints: one safetensors file, its ``__metadata__`` JSON says how to rebuild the score.

Metadata (DESIGN.md): ``{arch, arch_kwargs, sde, sde_kwargs, parameterisation, time_map, shape,
data_range, version}``.  ``load`` rebuilds ``(score_fn, sde, shape)`` with no pickle: the weights
are safetensors, the rest is JSON, and ``arch`` / ``sde`` must name classes this package ships.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

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


def read_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint's JSON metadata (ValueError naming the file if it is not a scorefast checkpoint)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("scorefast")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"path: {path} is not a readable safetensors file: {err}") from err
    if raw is None:
        raise ValueError(f"path: {path} has no scorefast metadata (not a scorefast model checkpoint)")
    meta = json.loads(raw)
    if meta.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"path: checkpoint format {meta['version']} is newer than this scorefast ({FORMAT_VERSION})")
    return meta


def load_model(path: str | os.PathLike, *, device=None, trainable: bool = False) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode with the checkpoint's weights, metadata); parameters frozen unless ``trainable``."""
    meta = read_metadata(path)
    model = build(meta["arch"], **meta["arch_kwargs"])
    model.load_state_dict(load_file(str(path)))
    return model.to(device or "cpu").eval().requires_grad_(trainable), meta


def load(path: str | os.PathLike, *, device=None) -> tuple[Callable, SDE, tuple[int, ...]]:
    """(score_fn(x, t) with t [B] in the SDE's time, sde, sample shape) from a checkpoint (frozen weights;
    ``score_fn.net`` is the model)."""
    model, meta = load_model(path, device=device)
    sde = sde_from_config(meta["sde"], meta["sde_kwargs"])
    score_fn = adapters.from_parameterisation(model, sde, meta["parameterisation"], time_map=meta["time_map"])
    score_fn.metadata = meta
    return score_fn, sde, tuple(meta["shape"])
