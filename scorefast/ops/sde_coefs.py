"""``scorefast::sde_coefs``: adaptive_sde's per-attempt coefficient table in one launch.

An attempt of ``adaptive_sde`` makes, per sample, the coefficients of its two fused updates from the
step h and the reverse drift a x + b s (b = -g^2, ``SDE.reverse_coefs``) at the attempt's two times
t0 = t and t1 = t - h.  With g_k = sqrt(-b_k) and sh = sqrt(h), the table out [10, B] holds the rows

    0: 1 - h a0        1: -h b0          2: g0 sh                        (Euler–Maruyama: x, s0, z)
    3: 1 - h/2 a0      4: -h/2 b0        5: -h/2 a1      6: -h/2 b1      (improved Euler: x, s0, x', s1)
    7: (g0 sh + g1 sh) / 2                                                (its noise)
    8: t0              9: t1                                              (the network's times)

An adapter's affine form (score = a' x + b' out, ``sf.adapters``) folds in when its coefficients at
the two times are given (fa = a', fb = b'): the drift becomes (a + b a') x + (b b') out, so rows 0, 3
and 5 take a_k + b_k fa_k in place of a_k and rows 1, 4 and 6 take b_k fb_k in place of b_k (each
product and sum rounded once), while the noise keeps g_k = sqrt(-b_k): the network's own output is
read by the fused updates, never formed into a score.

Arithmetic in float64 per sample, each product and sum rounded once (no fused multiply-add), then one
cast to ``dtype`` (the kernels' float32 or float64): elementwise, so bitwise the same for any batch.
Shapes: h [B]; times, a, b (fa, fb) [2, B]; all float64, contiguous, on one device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, backends

ROWS = ("x0", "s0", "z0", "x", "s0_half", "x1", "s1", "z1", "t0", "t1")
DTYPES = (torch.float32, torch.float64)


@torch.library.custom_op("scorefast::sde_coefs", mutates_args=())
def sde_coefs_op(
    h: Tensor,
    times: Tensor,
    a: Tensor,
    b: Tensor,
    fa: Tensor | None,
    fb: Tensor | None,
    dtype: torch.dtype,
    backend: str,
) -> Tensor:
    out = torch.empty(len(ROWS), h.shape[0], dtype=dtype, device=h.device)
    backends.get(backend).sde_coefs(out, h, times, a, b, fa, fb)
    return out


@sde_coefs_op.register_fake
def _(h, times, a, b, fa, fb, dtype, backend):
    return h.new_empty(len(ROWS), h.shape[0], dtype=dtype)


def sde_coefs_ref(
    out: Tensor, h: Tensor, times: Tensor, a: Tensor, b: Tensor, fa: Tensor | None = None, fb: Tensor | None = None
) -> None:
    """The readable reference (the torch backend): see the module docstring."""
    sh = h.sqrt()
    g = (-b).sqrt() * sh  # [2, B]: g_k sqrt(h), from the SDE's own b
    if fa is not None:  # the adapter's affine form folded into the drift
        a, b = a + b * fa, b * fb
    half = 0.5 * h
    rows = [1 - h * a[0], -(h * b[0]), g[0], 1 - half * a[0], -(half * b[0]), -(half * a[1]), -(half * b[1])]
    rows += [0.5 * (g[0] + g[1]), times[0], times[1]]
    out.copy_(torch.stack(rows))


def _check(h, times, a, b, dtype, fa=None, fb=None) -> None:
    if not isinstance(h, Tensor):
        raise TypeError(f"h: expected a tensor, got {type(h).__name__}")
    if h.dtype != torch.float64 or h.dim() != 1:
        raise ValueError(f"h: expected float64 [B], got {h.dtype} {list(h.shape)}")
    B = h.shape[0]
    if (fa is None) != (fb is None):
        raise ValueError("fa, fb: give both (an adapter's affine coefficients) or neither")
    named = (("times", times), ("a", a), ("b", b)) + ((("fa", fa), ("fb", fb)) if fa is not None else ())
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dtype != torch.float64 or tuple(t.shape) != (2, B):
            raise ValueError(f"{name}: expected float64 [2, {B}], got {t.dtype} {list(t.shape)}")
        if t.device != h.device:
            raise ValueError(f"{name}: on {t.device}, h on {h.device}")
    if dtype not in DTYPES:
        raise TypeError(f"dtype: expected torch.float32 or torch.float64, got {dtype!r}")


def sde_coefs(
    h: Tensor,
    times: Tensor,
    a: Tensor,
    b: Tensor,
    fa: Tensor | None = None,
    fb: Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    backend: str | None = None,
    trusted: bool = False,
) -> Tensor:
    """The table [10, B] in ``dtype`` (module docstring); ``fa``, ``fb``: an adapter's affine
    coefficients at the two times, folded in.  ``trusted``: adaptive_sde's per-attempt call
    (contiguous float64 arguments, ``backend`` a resolved name)."""
    if not trusted:
        _check(h, times, a, b, dtype, fa, fb)
        h, times, a, b = (v.contiguous() for v in (h, times, a, b))
        if fa is not None:
            fa, fb = fa.contiguous(), fb.contiguous()
        backend = backends.resolve(backend, h.device)
    if _checks.use_custom_op(h, times, a, b):
        return sde_coefs_op(h, times, a, b, fa, fb, dtype, backend)
    out = torch.empty(len(ROWS), h.shape[0], dtype=dtype, device=h.device)
    backends.get(backend).sde_coefs(out, h, times, a, b, fa, fb)
    return out
