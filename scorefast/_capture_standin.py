"""A CPU stand-in for CUDA-graph capture, behind ``scorefast.graphs.emulated()`` (tests without a GPU).

Only ``torch.cuda.CUDAGraph`` and ``torch.cuda.graph`` (and the stream calls the capture code makes:
``torch.cuda.Stream``, ``current_stream``, ``stream``, ``is_current_stream_capturing``) are replaced;
the real capture code of ``scorefast.graphs`` (``_capture_cuda``, ``_on_side_stream``,
``GraphedTrainStep``) runs on CPU tensors.  The replacement behaves as a CUDA graph does:

- Capture (``with torch.cuda.graph(g):``) records the aten ops the body dispatches (a
  ``TorchDispatchMode``: op, arguments, outputs) and changes nothing that existed before it: on a
  GPU a capture runs no kernel, so every tensor made before the capture (static buffers, the
  device step counter, tables, parameters, flags) is restored when it ends.  scorefast's own
  kernels are dispatched through their ``torch.library`` ops while recording (``_checks.RECORDING``;
  their eager fast path, which calls the same backend kernel directly, is invisible to a dispatch
  mode).
- Host values are frozen as at capture (they are arguments of the recorded ops).  A host read
  (``.item()``, ``bool(t)``, ``torch.equal``) or an op with a data-dependent output shape
  (``nonzero``, boolean indexing, ``unique`` ...) raises ``RuntimeError("CUDA error: operation not
  permitted when stream is capturing ...")`` and invalidates the capture; leaving the ``with``
  block then raises "operation failed due to a previous error during capture", as CUDA does.
- ``g.replay()`` runs the recorded ops again with fixed addresses: every argument is the very
  tensor object of the capture, and a fresh output of an op is copied into the tensor the capture
  made, so in-place writes, the copies back into static buffers (in their order) and the counter's
  advance happen for real, and tensors the host kept from the capture (a loss, a callback's
  state) hold the replay's values.
- A graph keeps no tensor alive that existed before its capture (a CUDA graph holds raw addresses
  only): the recorded ops hold such tensors weakly, and a replay that reads one that was freed, or
  whose storage moved or changed dtype since the capture (``net.half()`` swaps a parameter's data
  under the same object), raises ``RuntimeError`` where CUDA would read freed or stale memory.
  The tensors the capture made are the graph's own (its memory pool) and are held.

Not caught: a copy to the host (``t.cpu()`` is a no-op on a CPU tensor) and kernels that are not
dispatched (a C++ extension called directly).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from . import _checks

NOT_PERMITTED = "CUDA error: operation not permitted when stream is capturing"
INVALIDATED = "CUDA error: operation failed due to a previous error during capture"

_HOST_READS = {"_local_scalar_dense", "equal", "is_nonzero", "allclose", "item"}
_DATA_DEPENDENT = {
    "nonzero",
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "bincount",
    "masked_scatter",
}


_LIFTS = (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default, torch.ops.aten.lift.default)


@dataclass
class Stats:
    """What the stand-in did while installed: graphs constructed, captures completed, replays."""

    graphs: int = 0
    captures: int = 0
    replays: int = 0


_STATS: list[Stats] = []


def _forbidden(func, args, kwargs) -> str | None:
    """Why ``func`` cannot run in a capture (a host read or a data-dependent shape), or None."""
    name = func._schema.name.split("::")[-1]
    if name in _HOST_READS:
        return "reads a device value on the host"
    if name in _DATA_DEPENDENT:
        return "has a data-dependent output shape (a host sync)"
    if name == "repeat_interleave" and kwargs.get("output_size") is None and func._overloadname == "Tensor":
        return "has a data-dependent output shape (a host sync)"
    if name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1:
        indices = args[1] if isinstance(args[1], list | tuple) else ()
        if any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return "indexes with a boolean mask (a data-dependent shape, a host sync)"
    return None


def _storage_key(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no storage (a tensor subclass): nothing to keep
        return 0


class _Weak:
    """A tensor from before a capture, as a CUDA graph holds it: not kept alive, its address fixed."""

    __slots__ = ("dtype", "ptr", "ref", "shape")

    def __init__(self, t: Tensor):
        self.ref, self.ptr, self.dtype, self.shape = weakref.ref(t), _storage_key(t), t.dtype, tuple(t.shape)

    def get(self) -> Tensor:
        t = self.ref()
        what = f"a {self.dtype} tensor of shape {self.shape} from before the capture"
        if t is None:
            raise RuntimeError(
                f"capture stand-in: replay reads {what} that was freed since (a CUDA graph keeps no tensor "
                "alive: it would read freed memory)"
            )
        if _storage_key(t) != self.ptr or t.dtype != self.dtype:
            raise RuntimeError(
                f"capture stand-in: replay reads {what} whose storage moved or changed dtype since "
                f"(now {t.dtype}; a CUDA graph would read the old address)"
            )
        return t


def _resolve(value):
    return value.get() if isinstance(value, _Weak) else value


class _Recording(TorchDispatchMode):
    """Records the ops of a capture, keeping what existed before it unchanged at the end."""

    def __init__(self, graph: CUDAGraph):
        super().__init__()
        self.graph = graph
        self.created: set[int] = set()  # storages allocated by the capture
        self.saved: dict[int, tuple] = {}  # storages from before the capture: (storage, its values)
        self.owned: set[int] = set()  # ids of the tensor objects the capture made (held by its ops)
        self.weak: dict[int, _Weak] = {}  # tensors from before the capture, held weakly

    def _hold(self, t):
        """t as the recorded op keeps it: the capture's own tensors strongly, earlier ones weakly."""
        if not isinstance(t, Tensor) or id(t) in self.owned:
            return t
        w = self.weak.get(id(t))
        if w is None or w.ref() is not t:
            w = self.weak[id(t)] = _Weak(t)
        return w

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = _forbidden(func, args, kwargs)
        if reason is not None:
            self.graph._invalid = True
            raise RuntimeError(f"{NOT_PERMITTED} (capture stand-in: {func} {reason})")
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        keys = set()
        for t in inputs:
            key = _storage_key(t)
            keys.add(key)
            if key and key not in self.created and key not in self.saved:
                storage = t.untyped_storage()
                self.saved[key] = (storage, storage.clone())
        out = func(*args, **kwargs)
        given = {id(t) for t in inputs}
        if func in _LIFTS:  # a constant the capture made (``torch.tensor(v)``): the graph's own
            self.owned.update(given)
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and (key := _storage_key(t)) not in keys:
                self.created.add(key)
            if isinstance(t, Tensor) and id(t) not in given:
                self.owned.add(id(t))  # a new tensor object: the graph's own
        self.graph._ops.append((func, *tree_map(self._hold, (args, kwargs, out))))
        return out

    def restore(self) -> None:
        """What existed before the capture gets its values back (a GPU capture runs no kernel)."""
        for storage, values in self.saved.values():
            storage.copy_(values)
        self.saved.clear()


class CUDAGraph:
    """Stands in for ``torch.cuda.CUDAGraph``: capture records ops, ``replay`` runs them again."""

    def __init__(self, keep_graph: bool = False):
        self._ops: list = []
        self._invalid = False
        self._recording: _Recording | None = None
        for stats in _STATS:
            stats.graphs += 1

    def capture_begin(self, pool=None, capture_error_mode: str = "global") -> None:
        if self._recording is not None or self._ops:
            raise RuntimeError("capture stand-in: this graph was already captured")
        self._recording = _Recording(self)
        self._previous = _checks.RECORDING[0]
        _checks.RECORDING[0] = True
        self._recording.__enter__()

    def capture_end(self) -> None:
        recording, self._recording = self._recording, None
        recording.__exit__(None, None, None)
        _checks.RECORDING[0] = self._previous
        recording.restore()
        if self._invalid:
            self._ops = []
            raise RuntimeError(INVALIDATED)
        for stats in _STATS:
            stats.captures += 1

    def replay(self) -> None:
        """The recorded ops again, on the capture's tensors (fixed addresses), in their order."""
        if not self._ops:
            raise RuntimeError("capture stand-in: replay of a graph that was not captured")
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            for func, *recorded in self._ops:
                args, kwargs, out = tree_map(_resolve, recorded)
                result = func(*args, **kwargs)
                for kept, value in zip(tree_leaves(out), tree_leaves(result), strict=True):
                    if isinstance(kept, Tensor) and value is not kept and _storage_key(value) != _storage_key(kept):
                        kept.copy_(value)  # the op's fresh output, at the capture's address
        for stats in _STATS:
            stats.replays += 1

    def reset(self) -> None:
        self._ops = []

    def pool(self):
        return None


class graph:  # stands in for torch.cuda.graph
    """``with graph(g):`` captures the block into g (see ``CUDAGraph``)."""

    def __init__(self, cuda_graph: CUDAGraph, pool=None, stream=None, capture_error_mode: str = "global"):
        self.cuda_graph = cuda_graph

    def __enter__(self) -> None:
        self.cuda_graph.capture_begin()

    def __exit__(self, *exc) -> bool:
        self.cuda_graph.capture_end()  # raises INVALIDATED after a failed op, chained to the body's error
        return False


class Stream:
    """A no-op stream: CPU work is ordered already."""

    def __init__(self, device=None, priority: int = 0, **kwargs):
        self.device = device

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _current_stream(device=None) -> Stream:
    return Stream(device)


def _stream(stream=None):
    return nullcontext()


def _is_capturing() -> bool:
    return _checks.RECORDING[0]


@contextmanager
def installed() -> Iterator[Stats]:
    """torch.cuda's graph and stream calls replaced by the stand-in within the block; yields its Stats."""
    patches = {
        "CUDAGraph": CUDAGraph,
        "graph": graph,
        "Stream": Stream,
        "current_stream": _current_stream,
        "stream": _stream,
        "is_current_stream_capturing": _is_capturing,
    }
    saved = {name: getattr(torch.cuda, name) for name in patches}
    stats = Stats()
    _STATS.append(stats)
    for name, value in patches.items():
        setattr(torch.cuda, name, value)
    try:
        yield stats
    finally:
        for name, value in saved.items():
            setattr(torch.cuda, name, value)
        _STATS.remove(stats)
