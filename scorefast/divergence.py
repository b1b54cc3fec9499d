"""Divergence / Jacobian-trace estimators for per-sample maps fn: [B, ...] -> [B, ...].

``fn`` must act on each sample separately (its Jacobian is block-diagonal over the batch), as a
score network or an ODE drift does.  Probes come from stream 1 (DESIGN.md): probe j of sample i
is element j*D + e of that sample's draw, with step k = the caller's ``step``; they are drawn in
fp32 by the fast generator (the contract's values) and cast to the dtype they are used in.
Per-sample dot products are float64 sums in a fixed pairwise tree, so a sample's estimate does not
depend on the batch it is in.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from . import _checks
from .rng import STREAM_PROBES, rademacher, randn
from .solvers.adaptive import tree_sum

PROBES = ("rademacher", "gaussian")
ADS = ("vjp", "jvp")
METHODS = ("exact", "hutchinson", "hutch++")


def check_n_probes(n_probes: object, *, multiple: int = 1) -> int:
    """n_probes: an int >= ``multiple`` and a multiple of it (TypeError / ValueError naming it)."""
    if isinstance(n_probes, bool) or not isinstance(n_probes, numbers.Integral):
        raise TypeError(f"n_probes: expected an int, got {type(n_probes).__name__} {n_probes!r}")
    n_probes = int(n_probes)
    if n_probes < multiple or n_probes % multiple:
        need = "an int >= 1" if multiple == 1 else f"a positive multiple of {multiple} (Hutch++)"
        raise ValueError(f"n_probes: must be {need}, got {n_probes}")
    return n_probes


def check_fn_output(name: str, y: object, x: Tensor) -> Tensor:
    """A per-sample map's output: a float tensor shaped like x on x's device (never broadcast)."""
    if not isinstance(y, Tensor):
        raise TypeError(f"{name}: returned {type(y).__name__}, expected a tensor shaped like x {tuple(x.shape)}")
    if y.shape != x.shape:
        raise ValueError(f"{name}: returned {tuple(y.shape)}, expected x's shape {tuple(x.shape)}")
    if not y.is_floating_point():
        raise TypeError(f"{name}: returned {y.dtype}, expected a floating-point tensor")
    if y.device != x.device:
        raise ValueError(f"{name}: returned a tensor on {y.device}, but x is on {x.device}")
    return y


def _check_input(fn: object, x: object) -> int:
    if not callable(fn):
        raise TypeError(f"fn: must be callable as fn(x) -> tensor shaped like x, got {type(fn).__name__}")
    _checks.check_float_tensor("x", x)
    return _checks.check_batched("x", x)


def probes(x: Tensor, n: int, *, probe: str = "rademacher", seed=0, step=0, sample_ids=None, first: int = 0) -> Tensor:
    """Probes first .. first+n-1 shaped [n, B, ...] in x's dtype (stream 1, element j*D + e)."""
    if probe not in PROBES:
        raise ValueError(f"probe: expected one of {PROBES}, got {probe!r}")
    B, D = x.shape[0], x[0].numel()
    draw = rademacher if probe == "rademacher" else randn
    flat = draw(
        (B, (first + n) * D),
        seed=seed,
        step=step,
        stream=STREAM_PROBES,
        sample_ids=sample_ids,
        device=x.device,
        dtype=torch.float32,
    )
    flat = flat[:, first * D :]
    return flat.reshape(B, n, *x.shape[1:]).transpose(0, 1).to(x.dtype)


def per_sample_dot(a: Tensor, b: Tensor, lead: int = 2) -> Tensor:
    """[n, B, ...] x [n, B, ...] -> [n, B] (``lead=1``: [B, ...] x [B, ...] -> [B]): float64 sums over
    each sample's elements (fixed tree)."""
    if a.dtype != torch.float64:
        a = a.double()
    prod = a * b  # b (any float dtype) widens to float64 exactly inside the product: one op
    return tree_sum(prod.reshape(*prod.shape[:lead], -1))


def _engine_vjp() -> Callable | None:
    """``torch.autograd.graph._engine_run_backward``, the call ``torch.autograd.grad`` ends in (it
    keeps the caller's context for the engine's device threads), or None where this torch has none.
    ``torch.autograd.grad`` first normalises and checks its arguments in Python (about a tenth of a
    small network's forward and VJP on a CPU); ``vjp`` hands the engine what that would produce:
    one plain output, a cotangent of its shape in its dtype, one input."""
    graph = getattr(torch.autograd, "graph", None)
    return getattr(graph, "_engine_run_backward", None)


_RUN_BACKWARD = _engine_vjp()


def vjp(y: Tensor, xg: Tensor, v: Tensor, retain: bool) -> Tensor:
    """J^T v for y = fn(xg) recorded by autograd (v cast to y's dtype; no graph of the result).

    Plain tensors of one shape go to the autograd engine as ``torch.autograd.grad`` would send them
    (same result, same errors; a test holds both); tensor subclasses (``__torch_function__``), other
    shapes and compiled code take ``torch.autograd.grad`` itself."""
    v = v.to(y.dtype)
    if (
        _RUN_BACKWARD is not None
        and type(y) is Tensor
        and type(xg) is Tensor
        and type(v) is Tensor
        and y.shape == v.shape
        and not torch.compiler.is_compiling()
    ):
        # (outputs, cotangents, retain_graph, create_graph, inputs, allow_unused), no accumulation
        return _RUN_BACKWARD((y,), (v,), retain, False, (xg,), False, accumulate_grad=False)[0]
    return torch.autograd.grad(y, xg, v, retain_graph=retain)[0]


def vjp_trace(y: Tensor, xg: Tensor, vectors: Tensor, vectors64: Tensor | None = None) -> Tensor:
    """Hutchinson's mean over probes of v^T J v [B] (float64) for y = fn(xg) recorded by autograd
    (``vectors64``: the probes already in float64, when a caller reuses them)."""
    v64 = vectors if vectors64 is None else vectors64
    if len(vectors) == 1:
        return per_sample_dot(v64[0], vjp(y, xg, vectors[0], False), lead=1)
    jtv = torch.stack([vjp(y, xg, v, j < len(vectors) - 1) for j, v in enumerate(vectors)])
    return per_sample_dot(v64, jtv).mean(0)


def diagonal_trace(y: Tensor, xg: Tensor) -> Tensor:
    """tr(J) [B] (float64) for y = fn(xg) recorded by autograd: one VJP per coordinate, each keeping
    only its diagonal entry (memory O(B D)), added in coordinate order."""
    B, D = xg.shape[0], xg[0].numel()
    trace = torch.zeros(B, dtype=torch.float64, device=xg.device)
    onehot = torch.zeros(B, D, dtype=y.dtype, device=xg.device)
    for e in range(D):
        onehot[:, e] = 1
        g = vjp(y, xg, onehot.view(xg.shape), e < D - 1)
        onehot[:, e] = 0
        trace = trace + g.reshape(B, D)[:, e].double()
    return trace


def _recorded(fn: Callable, x: Tensor) -> tuple[Tensor, Tensor]:
    """(y = fn(xg), xg) with xg a leaf copy of x that requires grad, y checked."""
    xg = x.detach().requires_grad_(True)
    return check_fn_output("fn", fn(xg), x), xg


def vjp_products(fn: Callable, x: Tensor, vectors: Tensor) -> tuple[Tensor, Tensor]:
    """(fn(x), [J^T v_j for each v_j in vectors [n, B, ...]])."""
    with torch.enable_grad():
        y, xg = _recorded(fn, x)
        out = [vjp(y, xg, v, True) for v in vectors]
    return y.detach(), torch.stack(out)


def jvp_products(fn: Callable, x: Tensor, vectors: Tensor) -> tuple[Tensor, Tensor]:
    """(fn(x), [J v_j]) by forward-mode AD (torch.func.jvp)."""
    outs = []
    y = None
    for v in vectors:
        y, jv = torch.func.jvp(fn, (x,), (v,))
        check_fn_output("fn", y, x)
        outs.append(jv)
    return y.detach(), torch.stack(outs)


def hutchinson_trace(
    fn: Callable,
    x: Tensor,
    *,
    n_probes: int = 1,
    probe: str = "rademacher",
    seed=0,
    step=0,
    ad: str = "vjp",
    sample_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Hutchinson's estimate of tr(dfn/dx) per sample: mean over probes of v^T J v.

    One forward and one VJP (or JVP) per probe.  Returns (trace [B] float64, fn(x)).
    """
    _check_input(fn, x)
    n_probes = check_n_probes(n_probes)
    if ad not in ADS:
        raise ValueError(f"ad: expected one of {ADS}, got {ad!r}")
    v = probes(x, n_probes, probe=probe, seed=seed, step=step, sample_ids=sample_ids)
    if ad == "jvp":
        y, jv = jvp_products(fn, x, v)
        return per_sample_dot(v, jv).mean(0), y
    with torch.enable_grad():
        y, xg = _recorded(fn, x)
        trace = vjp_trace(y, xg, v)
    return trace, y.detach()


def exact_trace(fn: Callable, x: Tensor) -> tuple[Tensor, Tensor]:
    """tr(dfn/dx) per sample with D VJPs (one per coordinate): for small D.  Returns (trace, fn(x))."""
    _check_input(fn, x)
    with torch.enable_grad():
        y, xg = _recorded(fn, x)
        trace = diagonal_trace(y, xg)
    return trace, y.detach()


def hutchpp_trace(
    fn: Callable,
    x: Tensor,
    *,
    n_probes: int = 3,
    probe: str = "rademacher",
    seed=0,
    step=0,
    sample_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021) with n_probes = 3k matrix-vector products.

    Q = orth(J^T S) from k probes; tr = tr(Q^T J^T Q) + Hutchinson on (I - QQ^T) with k more.
    Returns (trace [B] float64, fn(x)).
    """
    _check_input(fn, x)
    k = check_n_probes(n_probes, multiple=3) // 3
    S = probes(x, k, probe=probe, seed=seed, step=step, sample_ids=sample_ids)
    G = probes(x, k, probe=probe, seed=seed, step=step, sample_ids=sample_ids, first=k)
    y, AS = vjp_products(fn, x, S)  # A = J^T (same trace)
    Q, _ = torch.linalg.qr(AS.double().flatten(2).permute(1, 2, 0))  # [B, D, k]
    Qv = Q.permute(2, 0, 1).reshape(k, *x.shape).to(x.dtype)
    _, AQ = vjp_products(fn, x, Qv)
    low_rank = per_sample_dot(Qv, AQ).sum(0)
    Gf = G.double().flatten(2).permute(1, 2, 0)  # [B, D, k]
    G_perp = Gf - Q @ (Q.transpose(1, 2) @ Gf)
    Gp = G_perp.permute(2, 0, 1).reshape(k, *x.shape).to(x.dtype)
    _, AG = vjp_products(fn, x, Gp)
    residual = per_sample_dot(Gp, AG).sum(0) / k
    return low_rank + residual, y


def divergence(
    fn: Callable,
    x: Tensor,
    *,
    method: str = "hutchinson",
    n_probes: int = 1,
    probe: str = "rademacher",
    seed=0,
    step=0,
    ad: str = "vjp",
    sample_ids: Tensor | None = None,
) -> Tensor:
    """div fn(x) = tr(dfn/dx) per sample [B] (float64): exact (D VJPs), hutchinson or hutch++."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if method == "exact":
        return exact_trace(fn, x)[0]
    if method == "hutch++":
        return hutchpp_trace(fn, x, n_probes=n_probes, probe=probe, seed=seed, step=step, sample_ids=sample_ids)[0]
    return hutchinson_trace(fn, x, n_probes=n_probes, probe=probe, seed=seed, step=step, ad=ad, sample_ids=sample_ids)[
        0
    ]
