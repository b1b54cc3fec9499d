"""``scorefast::select_rows``: an adaptive solver's accepted rows, several tensors in one launch.

out_i[b] = news_i[b] if mask[b] else olds_i[b] for pairs of [B, ...] tensors: a copy of whole rows,
so a rejected row's new values (NaN/inf included) are never read into the result (no arithmetic
with them, such as a multiplication by 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, backends


@torch.library.custom_op("scorefast::select_rows", mutates_args=())
def select_rows_op(mask: Tensor, news: list[Tensor], olds: list[Tensor], backend: str) -> list[Tensor]:
    outs = [torch.empty_like(v) for v in olds]
    backends.get(backend).select_rows(mask, outs, news, olds)
    return outs


@select_rows_op.register_fake
def _(mask, news, olds, backend):
    return [torch.empty_like(v) for v in olds]


def select_rows_ref(mask: Tensor, outs: list[Tensor], news: list[Tensor], olds: list[Tensor]) -> None:
    """The readable reference (the torch backend)."""
    for out, new, old in zip(outs, news, olds, strict=True):
        out.copy_(torch.where(mask.view((-1,) + (1,) * (old.dim() - 1)), new, old))


def select_rows(mask: Tensor, news, olds, *, backend: str | None = None, trusted: bool = False) -> list[Tensor]:
    """[where(mask, new, old) by rows for each pair]; mask bool [B]; pairs of contiguous [B, ...] tensors
    of one shape, dtype and device each.  ``trusted``: the solvers' call (checked once per run)."""
    news, olds = list(news), list(olds)
    if not trusted:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 1:
            raise TypeError(f"mask: expected a bool [B] tensor, got {getattr(mask, 'dtype', type(mask))}")
        if len(news) != len(olds):
            raise ValueError(f"news, olds: expected equally many tensors, got {len(news)} and {len(olds)}")
        for i, (new, old) in enumerate(zip(news, olds)):
            _checks.check_like(f"news[{i}]", new, old, other=f"olds[{i}]")
            if new.dtype != old.dtype:
                raise TypeError(f"news[{i}]: dtype {new.dtype} differs from olds[{i}]'s {old.dtype}")
            if old.shape[:1] != mask.shape or old.device != mask.device:
                raise ValueError(
                    f"olds[{i}]: expected [B={mask.shape[0]}, ...] on {mask.device}, got {list(old.shape)}"
                )
        news, olds = [v.contiguous() for v in news], [v.contiguous() for v in olds]
        backend = backends.resolve(backend, mask.device)
    if _checks.use_custom_op(mask, *news, *olds):
        return select_rows_op(mask, news, olds, backend)
    outs = [torch.empty_like(v) for v in olds]
    backends.get(backend).select_rows(mask, outs, news, olds)
    return outs
