"""The ``torch`` backend: readable reference of every op, float64-capable.

Arithmetic happens in float64 when the state is float64 and in float32 otherwise; noise is the
reference of ``scorefast.rng`` (Box-Muller in float64 on fp32 uniforms).  Sums of squares use a
fixed pairwise tree built from elementwise adds, so they are batch-invariant too.
"""

from __future__ import annotations

import torch

from ..rng import M32, noise_ref

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


def philox_step(step, draws: int = 1, draw: int = 0):
    """The Philox step n * draws + draw (mod 2**32) of step counter n (an int or a 0-d int64 tensor)."""
    if draws == 1 and draw == 0:
        return step
    if isinstance(step, torch.Tensor):
        return (step * draws + draw) & M32
    return (int(step) * draws + draw) & M32


def _ids(ids, B: int, device) -> torch.Tensor:
    return ids if ids is not None else torch.arange(B, dtype=torch.int64, device=device)


def coef_columns(coefs: torch.Tensor, row, dtype: torch.dtype) -> torch.Tensor:
    """[K, C] coefficients: ``coefs`` itself, or row ``row`` of a table [N, K] as one column [K, 1]."""
    c = coefs.to(dtype)
    if row is None:
        return c
    return c.index_select(0, torch.as_tensor(row, device=c.device).reshape(1)).T


def record_nonfinite(flag, values: torch.Tensor, step) -> None:
    """flag (0-d int64, -1 until set) := step counter n if a value is not finite and flag is still -1."""
    if flag is None:
        return
    bad = ~torch.isfinite(values).all()
    n = torch.as_tensor(step, dtype=torch.int64, device=flag.device)
    flag.copy_(torch.where(bad & (flag == -1), n, flag))


def fused_update(out, x, terms, coefs, ids, seed, step, stream, with_noise, *, row=None, draws=1, draw=0, flag=None):
    """out = c0*x + sum_t c_{1+t}*terms[t] + c_{T+1}*z.  ``coefs`` [K, C] (C = 1 or B), or with
    ``row`` a table [N, K] read at that row; Philox step ``step * draws + draw``; ``ids`` None: arange(B);
    ``flag``: set to ``step`` if a written value is not finite (and it is still -1)."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = coef_columns(coefs, row, cdt)
    acc = c[0, :, None] * x.to(cdt)
    for t, term in enumerate(terms):
        acc = acc + c[1 + t, :, None] * term.to(cdt)
    if with_noise:
        z = noise(_ids(ids, x.shape[0], x.device), x.shape[1], seed, philox_step(step, draws, draw), stream, 0, 1, cdt)
        acc = acc + c[len(terms) + 1, :, None] * z
    out.copy_(acc)
    record_nonfinite(flag, out, step)


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


def snr_langevin_step(
    out, eps, x, score, alpha, two_snr2, ids, seed, step, stream, *, row=None, draws=1, draw=0, flag=None
) -> None:
    """eps = (two_snr2 * alpha) * (|z|^2 / |score|^2) per sample (0 for a zero score), out = x +
    eps*score + sqrt(2 eps)*z.  ``alpha``: None (1), [1] or [B], or with ``row`` a table [N]."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    B, D = x.shape
    ids = _ids(ids, B, x.device)
    k = philox_step(step, draws, draw)
    s = score.to(cdt)
    z = noise(ids, D, seed, k, stream, 0, 1, cdt)
    g2, z2 = tree_sum(s * s), tree_sum(z * z)
    a = torch.ones(1, dtype=cdt, device=x.device) if alpha is None else alpha.to(cdt)
    if row is not None:
        a = a.index_select(0, torch.as_tensor(row, device=a.device).reshape(1))
    scored = g2 > 0
    e = torch.where(scored, (two_snr2 * a) * (z2 / torch.where(scored, g2, 1.0)), 0.0)
    eps.copy_(e)
    out.copy_(x.to(cdt) + e[:, None] * s + torch.sqrt(2.0 * e)[:, None] * z)
    record_nonfinite(flag, out, step)


# -- the adaptive solvers' per-attempt ops (their references live with the ops) ---------------------
def scaled_sumsq(e, y, y2, rtol, atol, mode) -> torch.Tensor:
    """[B] sums of squares of the scaled error rows (``scorefast.ops.scaled_sumsq``), fixed tree."""
    from ..ops.scaled_sumsq import scaled_rows_ref

    cdt = torch.float64 if e.dtype == torch.float64 else torch.float32
    v = scaled_rows_ref(e.to(cdt), y.to(cdt), y2.to(cdt), rtol, atol, mode)
    return tree_sum(v * v)


def step_control(accept, *args) -> None:
    """``scorefast.ops.step_control``'s reference."""
    from ..ops.step_control import step_control_ref

    step_control_ref(accept, *args)


def select_rows(mask, outs, news, olds) -> None:
    from ..ops.select_rows import select_rows_ref

    select_rows_ref(mask, outs, news, olds)


def sde_coefs(out, h, times, a, b, fa=None, fb=None) -> None:
    """``scorefast.ops.sde_coefs``'s reference."""
    from ..ops.sde_coefs import sde_coefs_ref

    sde_coefs_ref(out, h, times, a, b, fa, fb)
