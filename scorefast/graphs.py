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

On CPU ``cuda_graph`` is a no-op.  ``emulated()`` (for tests without a GPU) makes it trace the step
with ``make_fx`` and replay the traced graph instead: like a CUDA graph, a trace freezes every host
value, so a body that reads a per-step value on the host gives wrong samples there, and a body
that reads a tensor on the host fails to trace and takes the fallback.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from . import _checks
from .samplers.base import as_carry

_EMULATE = [False]
CHECK_DONE_EVERY = 8  # replays between host reads of an adaptive loop's done()


@contextmanager
def emulated() -> Iterator[None]:
    """Within this block ``cuda_graph=True`` on CPU traces and replays steps (make_fx), for tests."""
    previous, _EMULATE[0] = _EMULATE[0], True
    try:
        yield
    finally:
        _EMULATE[0] = previous


def mode_for(device: torch.device, cuda_graph: bool) -> str | None:
    """ "cuda" (capture), "fx" (CPU emulation inside ``emulated()``) or None (eager)."""
    if not cuda_graph:
        return None
    if device.type == "cuda":
        return "cuda"
    return "fx" if _EMULATE[0] else None


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
    """
    device = carry[0].device
    n_dev = torch.full((), start, dtype=torch.int64, device=device)

    def call(n: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        ctx._step = n
        return as_carry(body(n, *state))

    ctx._recorded = None
    carry = _warm_up(ctx.graph, call, n_dev, carry)
    if ctx._recorded is not None:
        ctx.report(start, *ctx._recorded)
    n_dev.add_(1)
    nfe_before = ctx.nfe
    try:
        replay = _CAPTURE[ctx.graph](ctx, call, n_dev, carry)
    except Exception as err:  # any capture failure falls back, with the reason
        ctx.nfe = nfe_before
        warnings.warn(
            f"cuda_graph: step {start + 1} could not be captured ({_reason(err)}); "
            "sampling the remaining steps eagerly (same results)",
            RuntimeWarning,
            stacklevel=4,
        )
        return carry, start + 1
    nfe_per_step, ctx.nfe = ctx.nfe - nfe_before, nfe_before
    ctx.captured = True
    state, n = carry, start + 1
    for n in range(start + 1, stop):
        if done is not None and (n - start - 1) % CHECK_DONE_EVERY == 0 and done(state):
            break
        state, recorded = replay(n)
        ctx.nfe += nfe_per_step
        if recorded is not None and (ctx.callback is not None or ctx._progress is not None):
            x, t, denoised = recorded
            ctx.report(n, x.clone(), t, None if denoised is None else denoised.clone())
    else:
        n = stop
    ctx._step = n
    return state, n


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


def _capture_cuda(ctx, call, n_dev: Tensor, carry):
    """Capture one step into static buffers; replay(n) runs step n (n advances on the device)."""
    static = tuple(c.clone() for c in carry)
    graph = torch.cuda.CUDAGraph()
    ctx._recorded = None
    with _capturing("cuda"), torch.cuda.graph(graph):
        out = call(n_dev, static)
        for buffer, value in zip(static, out, strict=True):
            buffer.copy_(value)
        n_dev.add_(1)
    recorded = ctx._recorded

    def replay(n: int):
        graph.replay()
        return static, recorded

    return replay


def _capture_fx(ctx, call, n_dev: Tensor, carry):
    """make_fx trace of one step (the flags as inputs, mutated in place); replay(n) runs the trace."""
    from torch.fx.experimental.proxy_tensor import make_fx

    flags = (ctx._first_bad, ctx._bad_time)
    k = len(carry)

    def step(n, first_bad, bad_time, *state):
        ctx._first_bad, ctx._bad_time = first_bad, bad_time
        ctx._recorded = None
        out = call(n, state)
        recorded = () if ctx._recorded is None else tuple(r for r in ctx._recorded if r is not None)
        return (*out, *recorded)

    with _capturing("fx"):
        try:
            traced = make_fx(step)(n_dev.clone(), *(f.clone() for f in flags), *carry)
        finally:
            ctx._first_bad, ctx._bad_time = flags
    for node in traced.graph.nodes:  # a trace freezes data-dependent shapes that CUDA would sync on
        if node.op == "call_function" and getattr(node.target, "name", lambda: "")().split("::")[-1] in _SYNCING:
            raise RuntimeError(f"{node.target} has a data-dependent output shape (a host sync on CUDA)")
    shape = None if ctx._recorded is None else [r is not None for r in ctx._recorded]
    state = [carry]

    def replay(n: int):
        outs = traced(torch.full((), n, dtype=torch.int64, device=n_dev.device), *flags, *state[0])
        state[0] = tuple(outs[:k])
        if shape is None:
            return state[0], None
        extra = iter(outs[k:])
        return state[0], tuple(next(extra) if present else None for present in shape)

    return replay


_SYNCING = {"_unique2", "unique_dim", "unique_consecutive", "nonzero", "masked_select", "_local_scalar_dense"}
_CAPTURE = {"cuda": _capture_cuda, "fx": _capture_fx}


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
        if x.device.type != "cuda" or self._failed:
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
