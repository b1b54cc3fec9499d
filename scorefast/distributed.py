"""Production-scale sampling: a fixed list of global chunks, written atomically, resumable.

``sample_sharded`` splits sample ids [0, n) into chunks [kC, min((k+1)C, n)); chunk k is always
one ``sf.sample`` batch with those global ids, so the result does not depend on the world size
(bitwise, on the same hardware, backend and thread count).  Under ``torch.distributed`` rank r
takes chunks k = r, r + W, ...  Each chunk is written as ``chunks/chunk_<k>.safetensors`` by a
temp file + rename, with the SHA-256 of its samples and the run's config hash in its metadata.
``manifest.json`` (written by rank 0, atomically) holds the config; a rerun with the same config
skips every chunk that verifies, recomputes missing or corrupt ones (kill -9 loses at most the
chunks in flight, and duplicates none), and refuses a changed config, naming the setting.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from ._io import atomic_save_file, atomic_write_bytes, writable_dir
from .sde.base import SDE

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed group, or (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def _digest(samples: Tensor) -> str:
    return hashlib.sha256(samples.contiguous().cpu().numpy().tobytes()).hexdigest()


def _jsonable(v):
    if isinstance(v, Tensor):
        return {"tensor": list(v.shape), "dtype": str(v.dtype), "sha256": _digest(v.detach().float())}
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in sorted(v.items())}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return repr(v)


RESULT_NEUTRAL = ("cuda_graph",)  # sample options that never change a sample: a resume may differ in them


def run_config(score_fn, sde, n_samples, sample_shape, chunk, sampler, steps, seed, extra_args, options) -> dict:
    """The settings that determine every sample; a resume must match them all."""
    return {
        "n_samples": int(n_samples),
        "sample_shape": [int(s) for s in sample_shape],
        "chunk": int(chunk),
        "sampler": sampler,
        "steps": steps,
        "seed": int(seed),
        "sde": type(sde).__name__,
        "sde_config": _jsonable(sde.config()),
        "score_fn": getattr(score_fn, "__qualname__", type(score_fn).__name__),
        "extra_args": _jsonable(extra_args or {}),
        "sample_options": _jsonable({k: v for k, v in options.items() if k not in RESULT_NEUTRAL}),
    }


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def chunk_path(out_dir: Path, k: int) -> Path:
    return Path(out_dir) / "chunks" / f"chunk_{k:06d}.safetensors"


def _read_chunk(path: Path, config_hash: str, n_expected: int, *, with_meta: bool = False):
    """The chunk's samples (and metadata) if the file is complete, uncorrupted and of this run; else None."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        samples = load_file(str(path))["samples"]
    except Exception:
        return None
    if meta.get("config_hash") != config_hash or int(meta.get("n", -1)) != n_expected:
        return None
    if samples.shape[0] != n_expected or meta.get("sha256") != _digest(samples):
        return None
    return (samples, meta) if with_meta else samples


def _slice_extra(extra_args: dict | None, n_samples: int, first: int, count: int) -> dict:
    out = {}
    for key, value in (extra_args or {}).items():
        if isinstance(value, Tensor) and value.dim() > 0:
            if value.shape[0] != n_samples:
                raise ValueError(
                    f"extra_args[{key!r}]: per-sample conditioning must have n_samples={n_samples} rows "
                    f"(sliced by sample id), got {value.shape[0]}"
                )
            value = value[first : first + count]
        out[key] = value
    return out


def _load_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        manifest["config"]
        return manifest
    except (ValueError, KeyError) as err:
        warnings.warn(f"manifest: {path} is corrupt ({err}); rebuilding it from the verified chunks", stacklevel=3)
        return None


def sample_sharded(
    score_fn: Callable,
    sde: SDE,
    n_samples: int,
    out_dir: str | os.PathLike,
    *,
    sample_shape: Sequence[int],
    chunk: int = 4096,
    sampler: str = "pc",
    steps: int | None = None,
    seed: int = 0,
    extra_args: dict | None = None,
    progress: bool = False,
    device=None,
    config_extra: dict | None = None,
    **sample_options,
) -> Path:
    """Sample ids [0, n_samples) chunk by chunk into ``out_dir``; returns the manifest's path.

    Chunk k is ``sf.sample(score_fn, sde, (n_k, *sample_shape), sample_ids=arange(kC, kC + n_k), ...)``
    with per-sample tensors in ``extra_args`` sliced to those ids.  Call it on every rank of an
    initialised ``torch.distributed`` group (or in one process); rerun it to resume.
    ``config_extra`` (JSON-able, e.g. a checkpoint's hash) joins the settings a resume must match:
    the score function itself is only known by its qualified name.
    """
    from .sampling import sample

    if not callable(score_fn):
        raise TypeError("score_fn: must be callable as score_fn(x, t, **extra_args)")
    if not isinstance(sde, SDE):
        raise TypeError(f"sde: expected a scorefast.sde SDE, got {type(sde).__name__}")
    for name, value in (("n_samples", n_samples), ("chunk", chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
    sample_shape = tuple(int(s) for s in sample_shape)
    rank, world = rank_and_world()
    out = writable_dir(out_dir, "out_dir")
    (out / "chunks").mkdir(exist_ok=True)
    config = run_config(score_fn, sde, n_samples, sample_shape, chunk, sampler, steps, seed, extra_args, sample_options)
    config["extra"] = _jsonable(config_extra or {})
    digest = _config_hash(config)
    n_chunks = math.ceil(n_samples / chunk)
    error = None
    if rank == 0:
        old = _load_manifest(out)
        for key, value in config.items() if old is not None else ():
            if old["config"].get(key) != value:
                error = (
                    f"{key}: {out} holds a run with {key}={old['config'].get(key)!r}, this call has {value!r} "
                    "(use another out_dir, or the original settings to resume)"
                )
                break
    if world > 1:  # every rank raises the same error instead of waiting at a barrier for rank 0
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ValueError(error)
    if rank == 0:
        manifest = {
            "version": FORMAT_VERSION,
            "config": config,
            "config_hash": digest,
            "n_chunks": n_chunks,
            "complete": False,
        }
        atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    _barrier()
    mine = list(range(rank, n_chunks, world))
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else torch.device("cpu")
    with tqdm(total=len(mine), disable=not progress or rank != 0, desc=f"chunks (rank {rank}/{world})") as bar:
        for k in mine:
            first = k * chunk
            count = min(chunk, n_samples - first)
            path = chunk_path(out, k)
            if path.exists():
                if _read_chunk(path, digest, count) is not None:
                    bar.update(1)
                    continue
                warnings.warn(f"chunk {k}: {path} is corrupt or from another run; recomputing it", stacklevel=2)
            ids = torch.arange(first, first + count, dtype=torch.int64, device=device)
            x, info = sample(
                score_fn,
                sde,
                (count, *sample_shape),
                sampler=sampler,
                steps=steps,
                seed=seed,
                sample_ids=ids,
                extra_args=_slice_extra(extra_args, n_samples, first, count),
                device=device,
                return_info=True,
                **sample_options,
            )
            x = x.detach().cpu().contiguous()
            meta = {
                "chunk": str(k),
                "first_id": str(first),
                "n": str(count),
                "sha256": _digest(x),
                "config_hash": digest,
                "nfe": str(info["nfe"]),
                "seconds": repr(info["time_s"]),
            }
            atomic_save_file({"samples": x}, path, meta)
            bar.update(1)
    _barrier()
    if rank == 0:
        entries = []
        for k in range(n_chunks):
            count = min(chunk, n_samples - k * chunk)
            got = _read_chunk(chunk_path(out, k), digest, count, with_meta=True)
            if got is None:
                raise RuntimeError(f"chunk {k}: missing or corrupt after every rank finished")
            meta = got[1]
            entries.append(
                {
                    "chunk": k,
                    "file": str(chunk_path(out, k).relative_to(out)),
                    "first_id": k * chunk,
                    "n": count,
                    "sha256": meta["sha256"],
                    "nfe": int(meta.get("nfe", 0)),
                    "seconds": float(meta.get("seconds", "nan")),
                }
            )
        manifest = {
            "version": FORMAT_VERSION,
            "config": config,
            "config_hash": digest,
            "n_chunks": n_chunks,
            "complete": True,
            "chunks": entries,
        }
        atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    _barrier()
    return out / MANIFEST


def load_samples(out_dir: str | os.PathLike) -> Tensor:
    """All samples of a finished ``sample_sharded`` run, [n_samples, *sample_shape], in sample-id order.

    Every chunk is verified against its checksum; a missing or corrupt one is a ValueError naming it.
    """
    out = Path(out_dir)
    path = out / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        config, digest = manifest["config"], manifest["config_hash"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"out_dir: {path} is missing or corrupt: {err}") from err
    parts = []
    for k in range(manifest["n_chunks"]):
        count = min(config["chunk"], config["n_samples"] - k * config["chunk"])
        x = _read_chunk(chunk_path(out, k), digest, count)
        if x is None:
            raise ValueError(f"chunk {k}: {chunk_path(out, k)} is missing or corrupt; rerun sample_sharded to repair")
        parts.append(x)
    return torch.cat(parts)
