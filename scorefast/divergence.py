"""Divergence / Jacobian-trace estimators for per-sample maps fn: [B, ...] -> [B, ...].

``fn`` must act on each sample separately (its Jacobian is block-diagonal over the batch), as a
score network or an ODE drift does.  Probes come from stream 1 (DESIGN.md): probe j of sample i
is element j*D + e of that sample's draw, with step k = the caller's ``step``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import _checks
from .rng import STREAM_PROBES, rademacher, randn

PROBES = ("rademacher", "gaussian")
ADS = ("vjp", "jvp")
METHODS = ("exact", "hutchinson", "hutch++")


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
        dtype=torch.float32 if x.dtype != torch.float64 else torch.float64,
    )
    flat = flat[:, first * D :]
    return flat.reshape(B, n, *x.shape[1:]).transpose(0, 1).to(x.dtype)


def vjp_products(fn: Callable, x: Tensor, vectors: Tensor) -> tuple[Tensor, Tensor]:
    """(fn(x), [J^T v_j for each v_j in vectors [n, B, ...]])."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        y = fn(xg)
        if y.shape != x.shape:
            raise ValueError(f"fn: returned {tuple(y.shape)}, expected x's shape {tuple(x.shape)}")
        out = [torch.autograd.grad(y, xg, v, retain_graph=True)[0] for v in vectors]
    return y.detach(), torch.stack(out)


def jvp_products(fn: Callable, x: Tensor, vectors: Tensor) -> tuple[Tensor, Tensor]:
    """(fn(x), [J v_j]) by forward-mode AD (torch.func.jvp)."""
    outs = []
    y = None
    for v in vectors:
        y, jv = torch.func.jvp(fn, (x,), (v,))
        outs.append(jv)
    return y.detach(), torch.stack(outs)


def per_sample_dot(a: Tensor, b: Tensor) -> Tensor:
    """[n, B, ...] x [n, B, ...] -> [n, B] sums over each sample's elements (float64)."""
    return (a.double() * b.double()).flatten(2).sum(-1)


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
    _checks.check_float_tensor("x", x)
    _checks.check_batched("x", x)
    if not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes: must be an int >= 1, got {n_probes!r}")
    if ad not in ADS:
        raise ValueError(f"ad: expected one of {ADS}, got {ad!r}")
    v = probes(x, n_probes, probe=probe, seed=seed, step=step, sample_ids=sample_ids)
    y, jv = (vjp_products if ad == "vjp" else jvp_products)(fn, x, v)
    return per_sample_dot(v, jv).mean(0), y


def exact_trace(fn: Callable, x: Tensor) -> tuple[Tensor, Tensor]:
    """tr(dfn/dx) per sample with D VJPs (one per coordinate): for small D.  Returns (trace, fn(x))."""
    B, D = x.shape[0], x[0].numel()
    eye = torch.eye(D, dtype=x.dtype, device=x.device)
    basis = eye[:, None, :].expand(D, B, D).reshape(D, *x.shape)
    y, jtv = vjp_products(fn, x, basis)
    return per_sample_dot(basis, jtv).sum(0), y


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
    if not isinstance(n_probes, int) or n_probes < 3 or n_probes % 3:
        raise ValueError(f"n_probes: Hutch++ needs a multiple of 3 matrix-vector products, got {n_probes!r}")
    k = n_probes // 3
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
