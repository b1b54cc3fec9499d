"""Files that are never half-written (temp file beside the target + fsync + rename), writable-dir
checks, a per-directory lock, and moving a damaged file aside instead of deleting it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

LOCK_FILE = ".scorefast.lock"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp path beside ``path`` (same suffix, so writers that infer the format from it work);
    on success it replaces ``path`` with the mode a normal new file gets (0666 & ~umask, not
    mkstemp's 0600), on any error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """``safetensors.torch.save_file`` of contiguous CPU copies, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    return Path(path)


def atomic_savefig(fig, path: str | os.PathLike, **kwargs) -> Path:
    """``fig.savefig(path, **kwargs)``, atomically (the format from ``path``'s suffix)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **kwargs)
    return Path(path)


def dir_path(path: str | os.PathLike, name: str) -> Path:
    """``path`` as a Path, refusing what is not a path and the empty path (which would silently
    mean the current directory); writes nothing."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{name}: expected a directory path, got {type(path).__name__}")
    if not str(os.fspath(path)).strip():
        raise ValueError(f"{name}: an empty path (give a directory, e.g. runs/samples)")
    return Path(path)


def writable_dir(path: str | os.PathLike, name: str) -> Path:
    """Create ``path`` if needed and prove it writable; a ValueError naming ``name`` otherwise
    (``dir_path``'s checks first)."""
    out = dir_path(path, name)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_test_"):
            pass
    except OSError as err:
        raise ValueError(f"{name}: cannot write to {out}: {err}") from err
    return out


@contextlib.contextmanager
def dir_lock(path: str | os.PathLike, name: str) -> Iterator[Path]:
    """Hold an exclusive lock on directory ``path`` (a ``flock`` on a file in it, freed by the OS if
    the process dies); a second holder gets a ValueError naming ``name`` and the holder's pid.
    Where ``fcntl`` does not exist (Windows) the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield Path(path)
        return
    lock = Path(path) / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ValueError(
                f"{name}: {path} is in use by another scorefast process (pid {holder}); "
                "wait for it to finish, or use another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield Path(path)
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def move_aside(path: str | os.PathLike, why: str) -> Path:
    """Rename a damaged file to ``<name>.<why>-<n>`` beside it (never over another file) and return
    the new path: nothing a user computed is deleted."""
    path = Path(path)
    for n in range(1, 10_000):
        target = path.with_name(f"{path.name}.{why}-{n}")
        if not target.exists():
            os.replace(path, target)
            return target
    raise RuntimeError(f"{path}: too many files already moved aside beside it")
