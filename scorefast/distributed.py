"""Production-scale sampling: a fixed list of global chunks, written atomically, resumable.

``sample_sharded`` splits sample ids [0, n) into chunks [kC, min((k+1)C, n)); chunk k is always
one ``sf.sample`` batch with those global ids, so the result does not depend on the world size
(bitwise, on the same hardware, backend and thread count).  Under ``torch.distributed`` rank r
takes chunks k = r, r + W, ...  Each chunk is written as ``chunks/chunk_<k>.safetensors`` by a
temp file + rename; its header carries its own index and id range, the SHA-256 of its samples,
and the run's settings and their hash, so every chunk is checked against its name and its run.
``manifest.json`` (written by rank 0, atomically) holds the settings.  Every setting is validated
(by ``sf.sample``'s own checks) before anything is written.  A rerun with the same settings skips
every chunk that verifies and recomputes missing ones (kill -9 loses at most the chunks in
flight, and duplicates none); a damaged chunk or manifest is moved aside, never deleted.  A
changed setting is refused, naming it, whether it is read from the manifest or, when that is
lost, from the chunks' own headers; so is a chunk copied over another chunk's name.  Rank 0
holds a lock on the directory while it runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from ._io import atomic_save_file, atomic_write_bytes, dir_lock, move_aside, writable_dir
from .sde.base import SDE

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
MAX_ID = 1 << 32  # sample ids are Philox counter words (DESIGN "Noise")
_CHUNK_NAME = re.compile(r"chunk_(\d+)\.safetensors")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed group, or (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def _local_rank() -> int:
    value = os.environ.get("LOCAL_RANK", "0")
    try:
        local = int(value)
    except ValueError:
        raise ValueError(f"LOCAL_RANK: expected an int in the environment, got {value!r}") from None
    if local < 0:
        raise ValueError(f"LOCAL_RANK: must be >= 0, got {local}")
    return local


def resolve_device(device, name: str = "device") -> torch.device:
    """``torch.device(device)`` if this machine has it; a ValueError naming ``name`` otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name}: not a device: {device!r} (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: {dev} was asked for, but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: {dev} was asked for, but {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "meta":
        raise ValueError(f"{name}: the meta device holds no data to sample")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as err:
            raise ValueError(f"{name}: {dev} is not usable on this machine ({err})") from None
    return dev


def local_device(device=None) -> torch.device:
    """The device this process works on: ``device`` if given, else CUDA when available, else the
    CPU; a CUDA device without an index is ``cuda:LOCAL_RANK`` (torchrun's local rank, 0 alone)."""
    dev = resolve_device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = resolve_device(torch.device("cuda", _local_rank()), "LOCAL_RANK")
    return dev


def init_from_env(device=None) -> tuple[int, int, torch.device]:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1); (rank, world, device).

    On CUDA the process's device is ``cuda:LOCAL_RANK``, made current (``torch.cuda.set_device``)
    before ``init_process_group("nccl")`` so that every rank's NCCL communicator uses its own GPU;
    on the CPU the group uses gloo.  Alone (no torchrun) nothing is initialised."""
    dev = local_device(device)
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected an int in the environment, got {os.environ['WORLD_SIZE']!r}") from None
    if world > 1 and not torch.distributed.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            torch.distributed.init_process_group("nccl")
        else:
            torch.distributed.init_process_group("gloo")
    rank, world = rank_and_world()
    return rank, world, dev


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
    """The settings that determine every sample; a resume must match them all (as JSON reads them back)."""
    config = {
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
    return json.loads(json.dumps(config))


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def chunk_path(out_dir: Path, k: int) -> Path:
    return Path(out_dir) / "chunks" / f"chunk_{k:06d}.safetensors"


def _chunk_ids(config: dict, k: int) -> tuple[int, int]:
    """(first id, count) of chunk k."""
    first = k * config["chunk"]
    return first, min(config["chunk"], config["n_samples"] - first)


def _conflict(where, old: dict, new: dict) -> str | None:
    """The first setting in which run settings ``old`` (held by ``where``) differ from ``new``, as an error."""
    for key in (*new, *(k for k in old if k not in new)):
        if old.get(key) != new.get(key):
            return (
                f"{key}: {where} holds a run with {key}={old.get(key)!r}, this call has {new.get(key)!r} "
                "(use another out_dir, or the original settings to resume)"
            )
    return None


class _ChunkError(Exception):
    """A chunk file that cannot be used; ``foreign``: intact but of another run or index (refused,
    never overwritten), else damaged (moved aside and recomputed)."""

    def __init__(self, message: str, *, foreign: bool = False):
        super().__init__(message)
        self.foreign = foreign


def _header(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise _ChunkError(f"not a readable safetensors file ({err})") from None


def _check_header(meta: dict, path: Path, k: int, config: dict, digest: str) -> None:
    """Refuse (foreign) a chunk header that is not chunk k of this run."""
    if meta.get("config_hash") != digest:
        try:
            old = json.loads(meta.get("config", "null"))
        except (ValueError, RecursionError):
            old = None
        problem = _conflict(path, old, config) if isinstance(old, dict) else None
        raise _ChunkError(
            problem or f"{path} is not a chunk of this run (no matching settings in its header)", foreign=True
        )
    try:
        got = int(meta["chunk"]), int(meta["first_id"]), int(meta["n"])
    except (KeyError, ValueError) as err:
        raise _ChunkError(f"its header lacks its chunk index and id range ({err})") from None
    n_chunks = math.ceil(config["n_samples"] / config["chunk"])
    if got != (k, *_chunk_ids(config, k)):
        want = "no chunk of this run" if k >= n_chunks else f"chunk {k} (ids {_ids(config, k)})"
        have = f"chunk {got[0]} (ids {got[1]}..{got[1] + got[2] - 1})"
        raise _ChunkError(
            f"{path} holds {have}, but its name is {want}: a chunk file was copied or renamed; move it away",
            foreign=True,
        )


def _ids(config: dict, k: int) -> str:
    """'first..last' sample ids of chunk k, for messages."""
    first, count = _chunk_ids(config, k)
    return f"{first}..{first + count - 1}"


def _load_chunk(path: Path, k: int, config: dict, digest: str) -> tuple[Tensor, dict]:
    """(samples, header) of chunk k of this run, verified; a _ChunkError otherwise."""
    if not path.exists():
        raise _ChunkError("missing")
    meta = _header(path)
    _check_header(meta, path, k, config, digest)
    try:
        samples = load_file(str(path))["samples"]
    except (SafetensorError, OSError, KeyError) as err:
        raise _ChunkError(f"its samples are unreadable ({err})") from None
    count = _chunk_ids(config, k)[1]
    if tuple(samples.shape) != (count, *config["sample_shape"]) or meta.get("sha256") != _digest(samples):
        raise _ChunkError("its samples do not match their shape or checksum (damaged)")
    return samples, meta


def _manifest_problem(manifest) -> str | None:
    """Why a parsed manifest cannot be used (None if it can)."""
    if not isinstance(manifest, dict):
        return f"expected a JSON object, got {type(manifest).__name__}"
    config = manifest.get("config")
    if not isinstance(config, dict):
        return "it has no 'config' object"
    for key in ("n_samples", "chunk"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"config.{key} is not an int >= 1"
    shape = config.get("sample_shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        return "config.sample_shape is not a list of ints"
    if manifest.get("config_hash") != _config_hash(config):
        return "its config_hash does not match its config (edited or damaged)"
    if manifest.get("n_chunks") != math.ceil(config["n_samples"] / config["chunk"]):
        return "its n_chunks does not match its config"
    return None


def _read_manifest(out: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) if ``out`` holds a usable one, else (None, why: 'missing' or the damage)."""
    path = out / MANIFEST
    if not path.exists():
        return None, "missing"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None, f"not readable JSON ({type(err).__name__}: {err})"
    problem = _manifest_problem(manifest)
    return (None, problem) if problem else (manifest, None)


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


def _check_directory(out: Path, config: dict, digest: str) -> str | None:
    """Rank 0, before anything is written: the error that refuses this call, or None.

    The settings of the run already in ``out`` come from its manifest, or, when that is missing or
    damaged (moved aside), from the chunks' own headers; every chunk file's header must also
    match its name.  A manifest of other settings is replaced (with a warning) only if no chunk
    was written under it."""
    manifest, why = _read_manifest(out)
    chunks = sorted(p for p in (out / "chunks").glob("chunk_*.safetensors") if _CHUNK_NAME.fullmatch(p.name))
    if manifest is not None:
        problem = _conflict(out / MANIFEST, manifest["config"], config)
        if problem and chunks:
            return problem
        if problem:
            warnings.warn(f"out_dir: {out} holds settings of a run that wrote no chunk; replacing them", stacklevel=3)
    elif why != "missing":
        moved = move_aside(out / MANIFEST, "corrupt")
        warnings.warn(f"manifest: {out / MANIFEST} is corrupt ({why}); moved to {moved.name}", stacklevel=3)
    for path in chunks:
        try:
            _check_header(_header(path), path, int(_CHUNK_NAME.fullmatch(path.name)[1]), config, digest)
        except _ChunkError as err:
            if err.foreign:
                return str(err)  # an unreadable file is moved aside and recomputed when its turn comes
    if manifest is None and chunks:
        warnings.warn(f"manifest: rebuilding {out / MANIFEST} from the headers of {len(chunks)} chunk(s)", stacklevel=3)
    return None


class _Preflight(BaseException):
    """Raised by the stand-in score of ``_preflight`` at its first call: everything before it passed."""


def _preflight(sde, sample_shape, sampler, steps, seed, extra_args, n_samples, device, options) -> None:
    """Run ``sf.sample``'s own validation of every setting (sampler, steps, seed, options, shapes,
    extra_args) on the last sample id, stopping at the first network call: nothing is computed."""
    from .sampling import sample

    def stop(x, t, **kwargs):
        raise _Preflight

    last = n_samples - 1
    with contextlib.suppress(_Preflight):
        sample(
            stop,
            sde,
            (1, *sample_shape),
            sampler=sampler,
            steps=steps,
            seed=seed,
            sample_ids=torch.tensor([last], dtype=torch.int64, device=device),
            extra_args=_slice_extra(extra_args, n_samples, last, 1),
            device=device,
            **{**options, "cuda_graph": False, "progress": False},
        )


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
    ``device=None``: ``cuda:LOCAL_RANK`` when CUDA is available (made the current device), else CPU.
    ``config_extra`` (JSON-able, e.g. a checkpoint's hash) joins the settings a resume must match:
    the score function itself is only known by its qualified name.
    """
    if not callable(score_fn):
        raise TypeError("score_fn: must be callable as score_fn(x, t, **extra_args)")
    if not isinstance(sde, SDE):
        raise TypeError(f"sde: expected a scorefast.sde SDE, got {type(sde).__name__}")
    for name, value in (("n_samples", n_samples), ("chunk", chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
    if n_samples > MAX_ID:
        raise ValueError(f"n_samples: sample ids are 32-bit counters, at most {MAX_ID} samples, got {n_samples}")
    if isinstance(sample_shape, str) or not isinstance(sample_shape, Sequence):
        raise TypeError(f"sample_shape: expected a sequence of ints, got {sample_shape!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sample_shape):
        raise ValueError(f"sample_shape: expected ints >= 1, got {tuple(sample_shape)!r}")
    sample_shape = tuple(sample_shape)
    rank, world = rank_and_world()
    device = local_device(device)
    if world > 1 and device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives run on the current device
    config = run_config(score_fn, sde, n_samples, sample_shape, chunk, sampler, steps, seed, extra_args, sample_options)
    config["extra"] = json.loads(json.dumps(_jsonable(config_extra or {})))
    _preflight(sde, sample_shape, sampler, steps, seed, extra_args, n_samples, device, sample_options)
    out = writable_dir(out_dir, "out_dir")  # the first write: every setting is valid
    (out / "chunks").mkdir(exist_ok=True)
    digest = _config_hash(config)
    n_chunks = math.ceil(n_samples / chunk)
    with contextlib.ExitStack() as lock:
        error = None
        if rank == 0:
            try:
                lock.enter_context(dir_lock(out, "out_dir"))
                error = _check_directory(out, config, digest)
            except ValueError as err:
                error = str(err)
        if world > 1:  # every rank raises the same error instead of waiting at a barrier for rank 0
            box = [error]
            torch.distributed.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise ValueError(error)
        if rank == 0:
            _write_manifest(out, config, digest, n_chunks, None)
        _barrier()
        _run_chunks(score_fn, sde, out, config, digest, (rank, world, device), extra_args, progress, sample_options)
        _barrier()
        if rank == 0:
            entries = []
            for k in range(n_chunks):
                path = chunk_path(out, k)
                try:
                    meta = _load_chunk(path, k, config, digest)[1]
                except _ChunkError as err:
                    raise RuntimeError(f"chunk {k}: {path} after every rank finished: {err}") from None
                first, count = _chunk_ids(config, k)
                entries.append(
                    {
                        "chunk": k,
                        "file": str(path.relative_to(out)),
                        "first_id": first,
                        "n": count,
                        "sha256": meta["sha256"],
                        "nfe": int(meta.get("nfe", 0)),
                        "seconds": float(meta.get("seconds", "nan")),
                    }
                )
            _write_manifest(out, config, digest, n_chunks, entries)
        _barrier()
    return out / MANIFEST


def _write_manifest(out: Path, config: dict, digest: str, n_chunks: int, entries: list | None) -> None:
    manifest = {
        "version": FORMAT_VERSION,
        "config": config,
        "config_hash": digest,
        "n_chunks": n_chunks,
        "complete": entries is not None,
        **({"chunks": entries} if entries is not None else {}),
    }
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def _run_chunks(score_fn, sde, out, config, digest, where, extra_args, progress, options) -> None:
    """This rank's chunks k = rank, rank + world, ...: verified ones are kept, the rest computed."""
    from tqdm.auto import tqdm

    from .sampling import sample

    rank, world, device = where
    mine = list(range(rank, math.ceil(config["n_samples"] / config["chunk"]), world))
    with tqdm(total=len(mine), disable=not progress or rank != 0, desc=f"chunks (rank {rank}/{world})") as bar:
        for k in mine:
            first, count = _chunk_ids(config, k)
            path = chunk_path(out, k)
            if path.exists():
                try:
                    _load_chunk(path, k, config, digest)
                    bar.update(1)
                    continue
                except _ChunkError as err:
                    if err.foreign:  # appeared after rank 0's check: never overwrite it
                        raise ValueError(str(err)) from None
                    moved = move_aside(path, "corrupt")
                    warnings.warn(
                        f"chunk {k}: {path} is corrupt ({err}); moved to {moved.name}, recomputing it", stacklevel=3
                    )
            ids = torch.arange(first, first + count, dtype=torch.int64, device=device)
            x, info = sample(
                score_fn,
                sde,
                (count, *config["sample_shape"]),
                sampler=config["sampler"],
                steps=config["steps"],
                seed=config["seed"],
                sample_ids=ids,
                extra_args=_slice_extra(extra_args, config["n_samples"], first, count),
                device=device,
                return_info=True,
                **options,
            )
            x = x.detach().cpu().contiguous()
            meta = {
                "chunk": str(k),
                "first_id": str(first),
                "n": str(count),
                "sha256": _digest(x),
                "config_hash": digest,
                "config": json.dumps(config, sort_keys=True),
                "nfe": str(info["nfe"]),
                "seconds": repr(info["time_s"]),
            }
            atomic_save_file({"samples": x}, path, meta)
            bar.update(1)


def load_samples(out_dir: str | os.PathLike) -> Tensor:
    """All samples of a finished ``sample_sharded`` run, [n_samples, *sample_shape], in sample-id order.

    Every chunk is verified (its checksum, and its header's run, index and id range against its
    name); a missing, damaged or misplaced one is a ValueError naming its file.
    """
    out = Path(out_dir)
    manifest, why = _read_manifest(out)
    if manifest is None:
        raise ValueError(f"out_dir: {out / MANIFEST} is {why if why == 'missing' else 'corrupt: ' + why}")
    config, digest = manifest["config"], manifest["config_hash"]
    parts = []
    for k in range(manifest["n_chunks"]):
        path = chunk_path(out, k)
        try:
            parts.append(_load_chunk(path, k, config, digest)[0])
        except _ChunkError as err:
            raise ValueError(f"chunk {k}: {path}: {err}; rerun sample_sharded to repair") from None
    return torch.cat(parts)
