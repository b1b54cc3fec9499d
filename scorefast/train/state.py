"""Nested training state (optimizer, scaler, EMA) <-> flat safetensors tensors + a JSON skeleton.

Tensors become ``{"__tensor__": key}`` in the skeleton; dict keys keep their type (optimizer state
is keyed by int); tuples stay tuples.  Nothing is pickled.  ``read_metadata`` reads a state
file's JSON and refuses a format version this scorefast does not know.
"""

from __future__ import annotations

import json

import torch
from safetensors import SafetensorError, safe_open


def flatten(obj, prefix: str, tensors: dict[str, torch.Tensor]):
    """The JSON-able skeleton of ``obj``; its tensors go into ``tensors`` under ``prefix``-based keys."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"state: cannot store a {type(obj).__name__} at {prefix} (tensors, numbers, strings, containers)")


def unflatten(skeleton, tensors: dict[str, torch.Tensor]):
    """Inverse of ``flatten``."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            key = skeleton["__tensor__"]
            if key not in tensors:
                raise ValueError(f"state: tensor {key!r} is missing from the checkpoint")
            return tensors[key]
        if "__dict__" in skeleton:
            return {k: unflatten(v, tensors) for k, v in skeleton["__dict__"]}
        if "__tuple__" in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton["__tuple__"])
        raise ValueError(f"state: malformed skeleton entry {sorted(skeleton)}")
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    return skeleton


def read_metadata(path, key: str, version: int) -> dict:
    """The JSON object a state file holds under metadata ``key``, refusing a file that is unreadable,
    not such a state, or of a format ``version`` this scorefast does not know (a ValueError naming
    the file); no tensor is read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(key)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"path: {path} is not a readable training state: {err}") from err
    if raw is None:
        raise ValueError(f"path: {path} is not a scorefast training state (no {key!r} metadata)")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"path: {path}: its {key!r} metadata is not valid JSON ({type(err).__name__})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"path: {path}: its {key!r} metadata must be a JSON object, got {type(meta).__name__}")
    found = meta.get("version")
    if isinstance(found, bool) or not isinstance(found, int) or found != version:
        newer = isinstance(found, int) and not isinstance(found, bool) and found > version
        raise ValueError(
            f"path: {path} is a training state of format version {found!r}; this scorefast reads version {version}"
            + (" (it was written by a newer scorefast)" if newer else "")
        )
    return meta
