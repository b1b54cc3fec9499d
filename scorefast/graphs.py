"""CUDA-graph capture of sampler steps: ``sf.sample(..., cuda_graph=True)``.

A sampler hands its uniform steps to ``Context.steps(body, carry, start, stop)``.  With graphs on,
``run_steps``:

1. runs step ``start`` eagerly with a *device* step index n (a 0-d int64 tensor), on a side stream
   on CUDA: the warm-up that lazy initialisation (cuBLAS workspaces, autotuning, tables) needs;
2. captures step ``start + 1`` once into static state buffers.  The body reads its coefficients,
   grid time and Philox step (n*S + j) from device tables indexed by n, so nothing per-step is
   frozen into the graph; the graph writes the new state back into the buffers and advances n;
3. replays the graph for the remaining steps.  The host only launches it, counts NFE and runs the
   user's callback and progress bar; the non-finite flag is a device tensor read after the run.

Noise is made in-kernel from the device counter, so a replay draws exactly the numbers an eager
step draws.  Where a step cannot be captured (a network that reads a tensor on the host, an op
that cannot be captured) one ``RuntimeWarning`` says why and the remaining steps run eagerly from
the same state: the same results, never silently different ones.

One capture per configuration: ``sf.sample`` keys the step graph by (score_fn, SDE, shape, dtype,
device, sampler and its options, grid, precision, backend, which step loop of the run, the ambient
autocast / inference / grad modes, and of every ``nn.Module`` reachable from score_fn its
``training`` flags and where and how its parameters and buffers are stored) and a later
call with the same key replays the cached graph without capturing.  Its seed, sample ids, initial
state and tensor ``extra_args`` are static inputs that each run copies in (never frozen), and the
result is copied out of the shared buffers.  A graph holds raw addresses, so a cache entry keeps
alive everything its capture read: the score_fn (keyed by identity), its network and the run's
tables stay in memory until the entry is evicted (the ``CACHE_SIZE`` most recently used graphs are
kept) or ``clear_cache()`` runs.  The graph reads parameters in place: an update in place (an
optimizer step, ``load_state_dict``) is replayed, a new parameter or storage is another key.  An
entry serves one run at a time (another thread, or a callback sampling the same configuration,
meanwhile captures a graph of its own); a conditional projection (``sf.conditional``) is captured
per run.  Sharded chunks of one shape share one graph.

Host values the key cannot see are frozen in a cached graph: a score function that reads a Python
attribute or global (``self.scale`` in ``__call__``) replays the value of its capture after it
changed.  Pass such values as tensors in ``extra_args`` (inputs of the graph), or sample within
``with sf.graphs.no_cache():`` (a capture per run, nothing cached).

On CPU ``cuda_graph`` is a no-op.  ``emulated()`` (for tests without a GPU) runs this module's real
capture code on CPU tensors with a stand-in for ``torch.cuda.CUDAGraph`` / ``torch.cuda.graph``
(``scorefast._capture_standin``): a recorder of the dispatched ops that replays them at the
capture's addresses.  Like a CUDA graph it freezes every host value (a body that reads a per-step
value on the host gives wrong samples), refuses host reads and data-dependent shapes (the
fallback), and copies a step's outputs back into the static buffers in order (aliasing shows).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import threading
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import _capture_standin, _checks
from .samplers.base import as_carry

_EMULATE = [False]
CHECK_DONE_EVERY = 8  # replays between host reads of an adaptive loop's done()


@contextmanager
def emulated() -> Iterator[_capture_standin.Stats]:
    """Within this block ``cuda_graph=True`` on CPU runs the real capture code with the CPU stand-in
    for ``torch.cuda.CUDAGraph`` / ``torch.cuda.graph`` (``scorefast._capture_standin``), for tests.

    Yields the stand-in's counters (graphs constructed, captures, replays).  The step-graph cache is
    cleared on the way in and out: no stand-in graph outlives the block."""
    with _capture_standin.installed() as stats:
        previous, _EMULATE[0] = _EMULATE[0], True
        clear_cache()
        try:
            yield stats
        finally:
            clear_cache()
            _EMULATE[0] = previous


def _graphable(device: torch.device) -> bool:
    """A CUDA device, or any device while the stand-in is installed."""
    return device.type == "cuda" or _EMULATE[0]


def mode_for(device: torch.device, cuda_graph: bool) -> str | None:
    """ "cuda" (capture; on CPU only inside ``emulated()``) or None (eager)."""
    return "cuda" if cuda_graph and _graphable(device) else None


@contextmanager
def _capturing(mode: str) -> Iterator[None]:
    previous, _checks.CAPTURE[0] = _checks.CAPTURE[0], mode
    try:
        yield
    finally:
        _checks.CAPTURE[0] = previous


def run_steps(ctx, body: Callable, carry: tuple[Tensor, ...], start: int, stop: int, done: Callable | None = None):
    """Steps [start, stop) of ``body`` with one captured graph; returns (carry, next step to run eagerly).

    ``done(carry)`` (adaptive solvers) is read every ``CHECK_DONE_EVERY`` replays and ends the loop.
    The graph is taken from the cache when ``sf.sample`` ran this configuration before (see
    ``clear_cache``), else captured (and cached when the configuration can be).
    """
    device = carry[0].device
    key, entry = _acquire(_step_key(ctx, body, carry, start, stop, done))
    if key is not None and entry is None:
        _own_inputs(ctx, device)  # the seed, ids and tensor extra_args become static inputs of the graph
    held = [entry]  # the cache entry this run uses (marked busy), released however the run ends
    try:
        return _run_graphed(ctx, body, carry, start, stop, done, key, held)
    finally:
        if held[0] is not None:
            _release(ctx, held[0])


def _run_graphed(ctx, body, carry, start: int, stop: int, done, key: tuple | None, held: list):
    """run_steps with the cache entry held[0] (None: capture, and cache it under key unless key is None)."""
    device = carry[0].device
    entry = held[0]
    n_dev = torch.full((), start, dtype=torch.int64, device=device) if entry is None else entry.n_dev

    def call(n: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        ctx._step = n
        return as_carry(body(n, *state))

    ctx._recorded = None
    carry = _warm_up(ctx.graph, call, torch.full((), start, dtype=torch.int64, device=device), carry)
    if ctx._recorded is not None:
        ctx.report(start, *ctx._recorded)
    if entry is not None:
        captured, nfe_per_step = entry.captured, entry.nfe_per_step
        entry.load(ctx, carry, start + 1)
    else:
        n_dev.fill_(start + 1)
        nfe_before = ctx.nfe
        try:
            captured = _capture_cuda(ctx, call, n_dev, carry)
        except Exception as err:  # any capture failure falls back, with the reason
            ctx.nfe = nfe_before
            warnings.warn(
                f"cuda_graph: step {start + 1} could not be captured ({_reason(err)}); "
                "sampling the remaining steps eagerly (same results)",
                RuntimeWarning,
                stacklevel=5,
            )
            return carry, start + 1
        nfe_per_step, ctx.nfe = ctx.nfe - nfe_before, nfe_before
        if key is not None:
            held[0] = _Entry(captured, n_dev, ctx, body, done, nfe_per_step)
            _remember(key, held[0])
    ctx.captured = True
    state, n = _replay_steps(ctx, captured, nfe_per_step, carry, start, stop, done)
    ctx._step = n
    if key is not None and state is captured.static:  # a later run of the cached graph rewrites them
        state = tuple(buffer.clone() for buffer in state)
    return state, n


def _replay_steps(ctx, captured: _Captured, nfe_per_step: int, carry, start: int, stop: int, done):
    """Replays for steps [start + 1, stop) (until done); returns (state, next step)."""
    state, n = carry, start + 1
    for n in range(start + 1, stop):
        if done is not None and (n - start - 1) % CHECK_DONE_EVERY == 0 and done(state):
            return state, n
        state, recorded = captured.replay()
        ctx.nfe += nfe_per_step
        if recorded is not None and (ctx.callback is not None or ctx._progress is not None):
            x, t, denoised = recorded
            t = t.clone() if isinstance(t, Tensor) else t  # the next replay rewrites the captured tensors
            ctx.report(n, x.clone(), t, None if denoised is None else denoised.clone())
    return state, stop


# -- one capture per configuration ----------------------------------------------------------------
CACHE_SIZE = 8  # captured step graphs kept (least recently used dropped first)


class _Uncacheable(Exception):
    """A part of the configuration that has no value key (the graph is then captured per run)."""


@dataclass
class _Run:
    """One ``sf.sample`` call's configuration key and how many graphed step loops it has run."""

    key: tuple
    loops: int = 0


_RUN: ContextVar[_Run | None] = ContextVar("scorefast_graph_run", default=None)
_NO_CACHE: ContextVar[bool] = ContextVar("scorefast_graph_no_cache", default=False)


@contextmanager
def no_cache() -> Iterator[None]:
    """Within the block ``cuda_graph=True`` captures a graph per run and neither reads nor fills the cache.

    For a score function whose result depends on host values the key cannot see (a Python attribute
    such as a guidance scale read by ``__call__``, a global): a cached graph replays them frozen as
    at its capture.  (Tensors in ``extra_args`` are inputs of the graph and need no opt-out.)"""
    token = _NO_CACHE.set(True)
    try:
        yield
    finally:
        _NO_CACHE.reset(token)


_CACHE: OrderedDict[tuple, _Entry] = OrderedDict()


@contextmanager
def configuration(key: tuple | None) -> Iterator[None]:
    """Within the block, graphed step loops are cached under ``key`` (from ``config_key``; None: not)."""
    token = _RUN.set(None if key is None else _Run(key))
    try:
        yield
    finally:
        _RUN.reset(token)


def config_key(score_fn: Callable, sde, **config) -> tuple | None:
    """The cache key of a sampling configuration, or None when it cannot be cached.

    score_fn is keyed by identity (a bound method by its object and function) and held by the key:
    a cached graph reads the network's memory, so its entry keeps the network alive until it is
    evicted or ``clear_cache()`` runs; the SDE and ``config`` (sampler, options, shape, dtype, device,
    grid, precision, backend ...) by value.  Tensors in ``config["extra"]`` are static inputs, keyed by shape, dtype
    and device only.  A value with no key (an arbitrary object) makes the configuration uncacheable.
    """
    ident = (_Same(score_fn.__self__), score_fn.__func__) if inspect.ismethod(score_fn) else (_Same(score_fn),)
    extra = config.pop("extra", {})
    device = torch.device(config.get("device", "cpu"))
    try:
        frozen = (_freeze(sde), _freeze(config), tuple(sorted((k, _freeze_input(v)) for k, v in extra.items())))
    except _Uncacheable:
        return None
    return (ident, frozen, _ambient(device), tuple(_module_state(m) for m in _modules_of(score_fn)))


def _ambient(device: torch.device) -> tuple:
    """The ambient state a capture freezes: autocast (enabled and dtype) per device type, inference mode
    and grad mode."""
    autocast = tuple(
        (d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in sorted({"cpu", "cuda", device.type})
    )
    return autocast, torch.is_inference_mode_enabled(), torch.is_grad_enabled()


def _modules_of(score_fn: Callable, depth: int = 2) -> list[torch.nn.Module]:
    """The ``nn.Module`` s reachable from score_fn within ``depth`` hops: score_fn itself, a bound method's
    object, closure cells, attributes (an adapter's ``net``), ``functools.partial`` arguments and the
    items of small containers met on the way."""
    found: dict[int, torch.nn.Module] = {}

    def visit(obj, level: int) -> None:
        if isinstance(obj, torch.nn.Module):
            found.setdefault(id(obj), obj)
            return
        if level < 0 or isinstance(obj, type | Tensor | str | bytes | int | float | types.ModuleType) or obj is None:
            return
        children: list = []
        if isinstance(obj, list | tuple | dict):
            children = list(obj.values() if isinstance(obj, dict) else obj)[:_WALK_ITEMS]
        else:
            if inspect.ismethod(obj):
                children.append(obj.__self__)
            if isinstance(obj, functools.partial):
                children += [obj.func, *obj.args, *obj.keywords.values()]
            for cell in getattr(obj, "__closure__", None) or ():
                with contextlib.suppress(ValueError):  # an empty cell
                    children.append(cell.cell_contents)
            attrs = getattr(obj, "__dict__", None)
            if isinstance(attrs, dict):
                children += list(attrs.values())[:_WALK_ITEMS]
        for child in children:
            visit(child, level - 1)

    visit(score_fn, depth)
    return list(found.values())


_WALK_ITEMS = 32  # attributes / container items looked at per object while finding modules


def _module_state(module: torch.nn.Module) -> tuple:
    """What a capture froze of a module: where and how its parameters and buffers are stored (``.to()`` /
    ``.half()`` swap the storage under the same objects) and every submodule's ``training``."""
    tensors = tuple(
        (t.data_ptr(), t.dtype, t.device, tuple(t.shape)) for t in (*module.parameters(), *module.buffers())
    )
    return id(module), tensors, tuple(m.training for m in module.modules())


class _Same:
    """A key part equal only to itself: an object by identity (no ``__hash__`` / ``__eq__`` of its own
    is called), held strongly so that its id cannot be reused while the key lives."""

    __slots__ = ("obj",)

    def __init__(self, obj: object):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj


def clear_cache() -> None:
    """Drop every cached step graph (with its static buffers, the networks and tables it reads and, on
    CUDA, its memory)."""
    with _LOCK:
        _CACHE.clear()


def _freeze(value):
    """A hashable value key of value: numbers, strings, dtypes, devices, containers, tensors (by
    their bytes), SDE-like objects (by their class itself and attributes)."""
    if value is None or isinstance(value, bool | int | float | str | torch.dtype | torch.device):
        return value
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, Tensor):
        data = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        return ("tensor", value.dtype, tuple(value.shape), hashlib.sha256(data.numpy().tobytes()).hexdigest())
    if hasattr(value, "__dict__") and not callable(value):
        return (type(value), _freeze(vars(value)))  # the class itself: one of the same name may differ
    raise _Uncacheable(type(value).__name__)


def _freeze_input(value):
    if isinstance(value, Tensor):
        return ("input", value.dtype, tuple(value.shape), value.device)
    return _freeze(value)


def _step_key(ctx, body, carry, start, stop, done) -> tuple | None:
    """The key of this step loop: the run's configuration, which loop of the run, its range, the body's
    code, the carry's layout, and whether the step records a callback's tensors (None: not cached)."""
    run = _RUN.get()
    if run is None or ctx.project is not None or _NO_CACHE.get():  # a conditional projection holds per-call data
        return None
    run.loops += 1
    layout = tuple((tuple(c.shape), c.dtype, c.device) for c in carry)
    code = getattr(body, "__code__", None)
    if code is None:
        return None
    # a callback's tensors are recorded by the capture only when there is a callback (glue otherwise)
    recorded = ctx.callback is not None
    return (run.key, run.loops, start, stop, code, layout, done is None, torch.is_grad_enabled(), recorded)


def _own_inputs(ctx, device: torch.device) -> None:
    """Before a capture that will be cached: the seed, sample ids and tensor extra_args as private device
    buffers, so a later run replays the graph with its own values copied in (never frozen)."""
    seed = torch.empty((), dtype=torch.int64, device=device)
    ctx.seed = seed.copy_(ctx.seed) if isinstance(ctx.seed, Tensor) else seed.fill_(ctx.seed)
    ctx._seed_t = None  # a seed tensor made by an eager loop before this one is not the graph's input
    ctx.sample_ids = ctx.sample_ids.clone()
    ctx.extra_args = {k: v.clone() if isinstance(v, Tensor) else v for k, v in ctx.extra_args.items()}


@dataclass
class _Entry:
    """A cached step graph and the inputs it reads: a later run copies its own values into them.

    A CUDA graph holds raw addresses only: the entry keeps alive everything the capture could have
    read, the capturing run's context (its tables, SDE, score_fn, flags) and the step's ``body`` and
    ``done`` (the closures' work buffers)."""

    captured: _Captured
    n_dev: Tensor
    ctx: object = field(repr=False)
    body: Callable = field(repr=False)
    done: Callable | None = field(repr=False)
    nfe_per_step: int = 0

    def __post_init__(self):
        ctx = self.ctx
        self.seed, self.ids = ctx.seed, ctx.sample_ids
        self.extra = {k: v for k, v in ctx.extra_args.items() if isinstance(v, Tensor)}
        self.first_bad, self.bad_time = ctx._first_bad, ctx._bad_time
        self.busy = False  # a run is replaying it

    def load(self, ctx, carry: tuple[Tensor, ...], n: int) -> None:
        """This run's state, step, seed, ids, extra_args and non-finite flags into the graph's inputs."""
        for buffer, value in zip(self.captured.static, carry, strict=True):
            buffer.copy_(value)
        self.n_dev.fill_(n)
        self.seed.copy_(ctx.seed) if isinstance(ctx.seed, Tensor) else self.seed.fill_(ctx.seed)
        self.ids.copy_(ctx.sample_ids)
        for k, buffer in self.extra.items():
            buffer.copy_(ctx.extra_args[k])
        self.first_bad.copy_(ctx._first_bad)
        self.bad_time.copy_(ctx._bad_time)
        ctx._first_bad, ctx._bad_time = self.first_bad, self.bad_time


_LOCK = threading.Lock()  # guards _CACHE and the entries' busy flags


def _acquire(key: tuple | None) -> tuple[tuple | None, _Entry | None]:
    """(key, the cached entry marked busy) or (key, None) when not cached; (None, None) when the entry is
    in use by a run still going (another thread, or a callback sampling the same configuration): that run
    captures a graph of its own and does not cache it."""
    if key is None:
        return None, None
    with _LOCK:
        entry = _CACHE.get(key)
        if entry is None:
            return key, None
        if entry.busy:
            return None, None
        entry.busy = True
        _CACHE.move_to_end(key)
        return key, entry


def _release(ctx, entry: _Entry) -> None:
    """The run is done with entry: the non-finite flags it wrote go back into tensors the run owns (a later
    run of the entry rewrites the entry's), and the entry is free for the next run."""
    ctx._first_bad, ctx._bad_time = entry.first_bad.clone(), entry.bad_time.clone()
    with _LOCK:
        entry.busy = False


def _remember(key: tuple, entry: _Entry) -> None:
    """Cache entry (in use by the run that made it) under key, dropping the least recently used."""
    entry.busy = True
    with _LOCK:
        _CACHE[key] = entry
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)


def _reason(err: BaseException) -> str:
    """The first line of the error that started a capture failure, for the fallback warning.

    ``torch.cuda.graph`` ends the capture on its way out even when the body raised, and ending an
    invalidated capture raises again ("operation failed due to a previous error during capture").
    The body's error, the one that says what could not be captured, is then the caught one's
    ``__context__``: name the first error of the chain.
    """
    seen = {id(err)}
    while (earlier := err.__cause__ or err.__context__) is not None and id(earlier) not in seen:
        seen.add(id(earlier))
        err = earlier
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:240]}"


def _warm_up(mode: str, call, n_dev: Tensor, carry):
    return _on_side_stream(n_dev.device, call, n_dev, carry) if mode == "cuda" else call(n_dev, carry)


def _on_side_stream(device: torch.device, fn: Callable, *args):
    """fn(*args) on a fresh side stream, ordered after and before the current stream's work: the warm-up
    a capture needs (lazy initialisation must not happen on the capture stream)."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        out = fn(*args)
    torch.cuda.current_stream(device).wait_stream(side)
    return out


def _copy_back(static: tuple[Tensor, ...], out: tuple[Tensor, ...]) -> None:
    """static[i] <- out[i] for every i, correct when an output is (a view of) another static buffer.

    A multistep body returns its history shifted, (x, D, D1) from (x, D1, D2): out[2] is static[1].
    Copying in index order would overwrite static[1] with D before static[2] reads it.  A buffer is
    written only after every copy that reads it; a cycle (a swap) goes through one clone."""
    if len(out) != len(static):
        raise ValueError(f"body: returned {len(out)} tensors for a carry of {len(static)}")
    owner = {buffer.untyped_storage().data_ptr(): i for i, buffer in enumerate(static)}
    pending: dict[int, tuple[Tensor, int | None]] = {}  # target -> (value, the buffer it reads or None)
    for i, value in enumerate(out):
        if value is static[i]:
            continue  # carried as it is
        j = owner.get(value.untyped_storage().data_ptr())
        pending[i] = (value.clone(), None) if j == i else (value, j)  # a view of its own buffer: a copy
    while pending:
        read = {j: k for k, (_, j) in pending.items() if j is not None}
        ready = [i for i in pending if i not in read]
        if not ready:  # a cycle (a swap): buffer i is freed by cloning what is read from it
            i = next(iter(pending))
            k = read[i]
            pending[k] = (pending[k][0].clone(), None)
            continue
        for i in ready:
            static[i].copy_(pending.pop(i)[0])


@dataclass
class _Captured:
    """A captured step: ``replay()`` runs the step at n_dev into ``static`` (and advances n_dev)."""

    graph: object
    static: tuple[Tensor, ...]
    recorded: tuple | None

    def replay(self) -> tuple[tuple[Tensor, ...], tuple | None]:
        self.graph.replay()
        return self.static, self.recorded


def _capture_cuda(ctx, call, n_dev: Tensor, carry) -> _Captured:
    """Capture one step into static buffers (n advances on the device)."""
    static = tuple(c.clone() for c in carry)
    graph = torch.cuda.CUDAGraph()
    ctx._recorded = None
    # a weight cast cached by an ambient autocast before the capture is freed when its region ends:
    # the capture makes its own casts (as make_graphed_callables requires cache_enabled=False)
    cache = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        with _capturing("cuda"), torch.cuda.graph(graph):
            _copy_back(static, call(n_dev, static))
            n_dev.add_(1)
    finally:
        torch.set_autocast_cache_enabled(cache)
    return _Captured(graph, static, ctx._recorded)


class GraphedTrainStep:
    """``TrainStep`` captured in a CUDA graph: ``graphed(x) -> loss`` (see ``TrainStep.cuda_graph``).

    The first ``warmup`` calls run eagerly on a side stream (optimizer state, GradScaler, cuBLAS
    workspaces); the next call captures one step with x copied into a static batch, and every call
    after that copies x in and replays.  The step counter, warmup learning rates and EMA counter live
    on the device (``device_state=True``), so replay n is eager step n.  The host keeps ``step.step``
    in sync and reads the non-finite flag every ``check_every`` replays.  On CPU it calls the step.
    """

    def __init__(self, step, *, warmup: int = 3):
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup: must be an int >= 1 (eager steps before the capture), got {warmup!r}")
        if step._step_t is None:
            raise ValueError("step: capture needs TrainStep(..., device_state=True) (its counters on the device)")
        if step.skip_nonfinite:
            raise ValueError("step: skip_nonfinite reads the loss on the host every step and cannot be captured")
        if step.check_every == 1:
            raise ValueError(
                "step: check_every=1 reads the loss before the update; a captured step needs check_every=0 or K > 1"
            )
        self.step, self.warmup = step, warmup
        self._calls = 0
        self._failed = False
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_x: Tensor | None = None
        self._static_loss: Tensor | None = None

    def _check_capturable(self) -> None:
        groups = self.step.optimizer.param_groups
        if not all(group.get("capturable", False) for group in groups):
            raise ValueError(
                "optimizer: a captured step needs capturable=True in every param group, e.g. "
                "Adam(params, lr=torch.tensor(2e-4, device='cuda'), capturable=True, fused=True)"
            )
        if self.step.scaler is not None and not all(group.get("fused", False) for group in groups):
            raise ValueError("optimizer: fp16 under graphs needs a fused optimizer (GradScaler.step syncs otherwise)")

    def __call__(self, x: Tensor) -> Tensor:
        step = self.step
        if not _graphable(x.device) or self._failed:
            return step(x)
        if self._calls < self.warmup:
            self._check_capturable()
            self._calls += 1
            return _on_side_stream(x.device, step, x)
        if self._graph is None:
            try:
                self._capture(x)
            except Exception as err:  # a step that cannot be captured trains eagerly from here on
                self._failed = True
                step.optimizer.zero_grad(set_to_none=True)  # gradients of the aborted capture
                if step.scaler is not None:
                    step.scaler._per_optimizer_states.clear()  # back to READY (unscale_ ran in the capture)
                warnings.warn(
                    f"cuda_graph: the training step could not be captured ({_reason(err)}); "
                    "training eagerly (same results)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return step(x)
        elif x.shape != self._static_x.shape or x.dtype != self._static_x.dtype or x.device != self._static_x.device:
            raise ValueError(
                f"x: a captured step replays batches of {tuple(self._static_x.shape)} {self._static_x.dtype}, "
                f"got {tuple(x.shape)} {x.dtype}"
            )
        self._static_x.copy_(x)
        self._graph.replay()
        step.step += 1
        step.periodic_check()
        return self._static_loss.clone()

    def _capture(self, x: Tensor) -> None:
        step = self.step
        self._static_x = x.clone()
        graph = torch.cuda.CUDAGraph()
        check_every, host_step = step.check_every, step.step
        step.check_every = 0  # the host reads the flag between replays instead
        step.optimizer.zero_grad(set_to_none=True)
        try:
            with _capturing("cuda"), torch.cuda.graph(graph):
                self._static_loss = step(self._static_x)
        finally:
            step.check_every, step.step = check_every, host_step  # capture ran no step
        self._graph = graph
