"""Glue ops of one sampler step (DESIGN.md "The one-launch step and GPU truth (v6)").

Glue ops are the non-view aten ops of one captured step other than the network's own and
scorefast's fused ops.  ``captured_ops`` traces the step body that ``Context.steps`` would capture
(``make_fx``, device step index, the tables on the device as under ``cuda_graph=True``) and lists
them; ``eager_ops`` runs one eager step of the same body under a ``TorchDispatchMode`` and lists
the aten ops that reach the dispatcher.  The network is one opaque custom op
(``scorefast_glue::net``), so every other node is the sampler's (or the adapter's) own.

Own helpers, independent of ``scorefast.graphs``: the body is taken from ``Context.steps`` (patched
for the call), so what is counted is exactly what a capture would record.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import scorefast as sf
from scorefast import _checks
from scorefast.samplers import SAMPLERS
from scorefast.samplers.base import Context, as_carry

NET = "scorefast_glue::net"

# glue ops allowed per captured step (DESIGN.md); a sampler not named here (a new one) gets the
# default: a one-network-call multistep step, as dpm_solver++
BUDGETS = {
    "euler_maruyama": 2,
    "reverse_diffusion": 2,
    "ancestral": 2,
    "ddim": 2,
    "ode_euler": 2,
    "langevin": 2,
    "annealed_langevin": 2,
    "heun": 3,
    "dpm_solver++": 3,
    "pc": 4,
    "rk45": 8,  # one attempt
    "adaptive_sde": 8,  # one attempt, as rk45
}
DEFAULT_BUDGET = 3


def budget(name: str) -> int:
    return BUDGETS.get(name, DEFAULT_BUDGET)


@torch.library.custom_op(NET, mutates_args=())
def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in network, opaque to tracing: -x / (1 + t^2) (t [B] broadcast over x's rows)."""
    tt = t.to(torch.float32).reshape((-1,) + (1,) * (x.dim() - 1))
    return (-x.to(torch.float32) / (1 + tt * tt)).to(x.dtype)


@net.register_fake
def _(x, t):
    return torch.empty_like(x)


def plain_score(x, t):
    """A plain score callable: the network's output is the score."""
    return net(x, t)


# (sampler, options, sde) cases, one row each; the SDE is VPSDE unless a sampler needs another
def cases() -> list[tuple[str, dict, object]]:
    vp, ve, edm = sf.sde.VPSDE(), sf.sde.VESDE(), sf.sde.EDM()
    out = []
    for name in SAMPLERS:
        sde = ve if name == "annealed_langevin" else vp
        if name == "pc":
            for predictor in ("reverse_diffusion", "euler_maruyama"):
                for norm in ("expected", "sample"):
                    out.append((name, {"predictor": predictor, "norm": norm}, sde))
        elif name == "dpm_solver++":
            for variant in ("2m", "2m-sde", "3m"):
                out.append((name, {"variant": variant}, sde))
        elif name == "ddim":
            out += [(name, {"eta": 0.0}, sde), (name, {"eta": 1.0}, sde)]
        elif name == "heun":
            out += [(name, {}, sde), (name, {"s_churn": 1.0}, edm)]
        elif name == "annealed_langevin":
            out.append((name, {"n_steps_each": 1}, sde))
        else:
            out.append((name, {}, sde))
    return out


def case_id(name: str, options: dict, sde) -> str:
    opts = ",".join(f"{k}={v}" for k, v in options.items())
    return f"{name}[{opts}]" if opts else name


class _Stop(Exception):
    pass


# allocations launch no kernel (a fused op's output, allocated by its wrapper in eager mode)
_ALLOCATIONS = frozenset(("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"))


def _is_glue(target) -> bool:
    """A non-view aten op that is neither the network's, scorefast's fused ops', nor an allocation."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if target.namespace in ("scorefast", "scorefast_glue"):
        return False
    return not target.is_view and target._opname not in _ALLOCATIONS


@contextmanager
def _intercept(handler: Callable):
    """Within: the first ``Context.steps`` call with at least 3 steps hands (ctx, body, carry, start)
    to ``handler`` and stops the sampler (``_Stop``)."""
    original = Context.steps

    def steps(self, body, carry, start, stop, *, done=None):
        if stop - start >= 3:
            handler(self, body, as_carry(carry), start)
            raise _Stop
        return original(self, body, carry, start, stop, done=done)

    Context.steps = steps
    try:
        yield
    finally:
        Context.steps = original


def _run(score_fn, name, options, sde, shape, cuda_graph):
    from scorefast import graphs

    try:
        with graphs.emulated():
            sf.sample(score_fn, sde, shape, sampler=name, steps=8, cuda_graph=cuda_graph, seed=3, **options)
    except _Stop:
        return
    raise AssertionError(f"{name}: no uniform step loop of >= 3 steps")


def captured_ops(name: str, options: dict, sde, score_fn=plain_score, shape=(4, 3)) -> list[str]:
    """The glue ops (aten overload names, in order) of one captured step of the sampler."""
    from torch.fx.experimental.proxy_tensor import make_fx

    found: list[str] = []

    def handler(ctx, body, carry, start):
        ctx._device_flags(carry[0].device)
        n = torch.full((), start, dtype=torch.int64, device=carry[0].device)
        carry = as_carry(body(n, *carry))  # the warm-up step a capture runs first (per-run tables are made)
        n = n + 1
        previous, _checks.CAPTURE[0] = _checks.CAPTURE[0], "fx"
        try:
            traced = make_fx(lambda n, *state: as_carry(body(n, *state)))(n, *carry)
        finally:
            _checks.CAPTURE[0] = previous
        found.extend(
            str(node.target) for node in traced.graph.nodes if node.op == "call_function" and _is_glue(node.target)
        )

    with _intercept(handler):
        _run(score_fn, name, options, sde, shape, cuda_graph=True)
    return found


class _Counter(TorchDispatchMode):
    """Lists the glue ops dispatched outside scorefast's backend kernels (which are the fused ops)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside and _is_glue(func):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _Backend:
    """A backend module whose kernels run with the counter told it is inside a fused op."""

    def __init__(self, module, counter: _Counter):
        self._module, self._counter = module, counter

    def __getattr__(self, name):
        value = getattr(self._module, name)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            self._counter.inside += 1
            try:
                return value(*args, **kwargs)
            finally:
                self._counter.inside -= 1

        return call


@contextmanager
def _counting():
    from scorefast import backends

    counter = _Counter()
    original = backends.get
    backends.get = lambda name: _Backend(original(name), counter)
    try:
        with counter:
            yield counter
    finally:
        backends.get = original


def eager_ops(name: str, options: dict, sde, score_fn=plain_score, shape=(4, 3)) -> list[str]:
    """The aten glue ops that reach the dispatcher in one eager step (int step index) of the sampler."""
    found: list[str] = []

    def handler(ctx, body, carry, start):
        carry = as_carry(body(start, *carry))  # the first step makes the per-run tables
        with _counting() as counter:
            body(start + 1, *carry)
        found.extend(counter.ops)

    with _intercept(handler):
        _run(score_fn, name, options, sde, shape, cuda_graph=False)
    return found
