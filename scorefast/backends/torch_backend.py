"""The ``torch`` backend: readable reference of every op, float64-capable.

Arithmetic happens in float64 when the state is float64 and in float32 otherwise; noise is the
reference of ``scorefast.rng`` (Box-Muller in float64 on fp32 uniforms).  Sums of squares use a
fixed pairwise tree built from elementwise adds, so they are batch-invariant too.
"""

from __future__ import annotations

import torch

from ..rng import noise_ref

_KIND_NAMES = {0: "uniform", 1: "normal", 2: "rademacher"}


def availability():
    return True, f"torch {torch.__version__} (reference, float64-capable)", ("cpu", "cuda")


def _int(t: int | torch.Tensor) -> int:
    return int(t)


def noise(
    B_ids: torch.Tensor, D: int, seed, step, stream: int, elem_offset: int, kind: int, dtype: torch.dtype
) -> torch.Tensor:
    step = step.to(B_ids.device) if isinstance(step, torch.Tensor) else step
    return noise_ref(_KIND_NAMES[kind], _int(seed), step, B_ids, stream, D, elem_offset, dtype)


def fill_noise(out, ids, seed, step, stream, elem_offset, kind) -> None:
    out.copy_(noise(ids, out.shape[1], seed, step, stream, elem_offset, kind, torch.float64))


def fused_update(out, x, terms, coefs, ids, seed, step, stream, with_noise) -> None:
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = coefs.to(cdt)
    acc = c[0, :, None] * x.to(cdt)
    for t, term in enumerate(terms):
        acc = acc + c[1 + t, :, None] * term.to(cdt)
    if with_noise:
        z = noise(ids, x.shape[1], seed, step, stream, 0, 1, cdt)
        acc = acc + c[len(terms) + 1, :, None] * z
    out.copy_(acc)


def tree_sum(v: torch.Tensor) -> torch.Tensor:
    """Row sums of [B, D] in a fixed pairwise tree (zero-padded to a power of two)."""
    _B, D = v.shape
    width = 1
    while width < D:
        width *= 2
    v = torch.nn.functional.pad(v, (0, width - D))
    while v.shape[1] > 1:
        v = v[:, 0::2] + v[:, 1::2]
    return v[:, 0]


def sumsq_norms(t, ids, D, seed, step, stream, with_noise, dtype=torch.float32) -> torch.Tensor:
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    B = ids.shape[0]
    out = torch.zeros(2, B, dtype=cdt, device=ids.device)
    if t is not None:
        tv = t.to(cdt)
        out[0] = tree_sum(tv * tv)
    if with_noise:
        z = noise(ids, D, seed, step, stream, 0, 1, cdt)
        out[1] = tree_sum(z * z)
    return out
