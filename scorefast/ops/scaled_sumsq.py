"""``scorefast::scaled_sumsq``: per-sample sum of squares of an adaptive solver's scaled error, one pass.

mode "rk45":  sum_e (e / (atol + rtol max(|y|, |y2|)))^2            (e the error estimate, y, y_new)
mode "sde":   sum_e ((e - y) / max(atol, rtol max(|y|, |y2|)))^2     (adaptive_sde: e = x'', y = x', y2 = x'_prev)

The scaling is elementwise in the state's arithmetic dtype (fp32, float64 for float64 states), and the
sum is ``sumsq_norms``' fixed tree (tiles from each sample's first element, fixed by D alone), so
the result is the same as ``sample_sumsq`` of the scaled rows, bitwise, without the scaled rows ever
being stored: batch-invariant (DESIGN.md "Batch invariance").
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, backends
from . import _common

MODES = ("rk45", "sde")


@torch.library.custom_op("scorefast::scaled_sumsq", mutates_args=())
def scaled_sumsq_op(e: Tensor, y: Tensor, y2: Tensor, rtol: float, atol: float, mode: str, backend: str) -> Tensor:
    """[B] sums (float32; float64 for float64 rows on the torch backend) of [B, D] rows."""
    return backends.get(backend).scaled_sumsq(e, y, y2, rtol, atol, mode)


@scaled_sumsq_op.register_fake
def _(e, y, y2, rtol, atol, mode, backend):
    return e.new_empty(e.shape[0], dtype=torch.float64 if e.dtype == torch.float64 else torch.float32)


def scaled_rows_ref(e: Tensor, y: Tensor, y2: Tensor, rtol: float, atol: float, mode: str) -> Tensor:
    """The scaled error rows (the reference's elementwise arithmetic)."""
    big = torch.maximum(y.abs(), y2.abs()).mul_(rtol)
    if mode == "rk45":
        return e / big.add_(atol)
    return (e - y) / big.clamp_min_(atol)


def scaled_sumsq(e: Tensor, y: Tensor, y2: Tensor, *, rtol: float, atol: float, mode: str = "rk45",
                 backend: str | None = None, trusted: bool = False) -> Tensor:  # fmt: skip
    """Per-sample sums of squares [B] of the scaled error of [B, ...] tensors e, y, y2 (see the module
    docstring).  ``trusted``: the solvers' per-attempt call (contiguous [B, D] rows, a resolved backend)."""
    if not trusted:
        _checks.check_float_tensor("e", e)
        _checks.check_batched("e", e)
        _checks.check_like("y", y, e)
        _checks.check_like("y2", y2, e)
        rtol = _checks.check_finite_scalar("rtol", rtol, positive=True)
        atol = _checks.check_finite_scalar("atol", atol, positive=True)
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        backend = _common.resolve_backend(backend, e)
        e, y, y2 = _common.rows(e), _common.rows(y), _common.rows(y2)
    if _checks.use_custom_op(e, y, y2):
        return scaled_sumsq_op(e, y, y2, float(rtol), float(atol), mode, backend)
    return backends.get(backend).scaled_sumsq(e, y, y2, rtol, atol, mode)
