"""Rejection sampling with memory (Rackauckas & Nie 2017, "Adaptive methods for stochastic
differential equations via natural embeddings and rejection sampling with memory", RSwM1) for an
adaptive SDE solver whose accept/reject test reads its own Brownian increments.

Redrawing the noise after a rejection, as Jolicoeur-Martineau et al.'s loop does, keeps the draws the
test accepted and throws the others away, so the increments a run uses are not those of a Brownian
path: the law is biased, and tightening the tolerance does not remove the bias (the test keeps
selecting draws at every tolerance; a 2-D Gaussian's variance under VE comes out 1.2x / 1.7x / 2.3x too
large at rtol = atol = 0.3 / 0.05 / 0.01, tests/test_adaptive_sde.py).  With memory, a rejected
increment W over a step h is split at the retry's step h' < h by the Brownian bridge,

    W' = (h'/h) W + sqrt(h' (h - h') / h) xi,        xi ~ N(0, 1),

and the rest (h - h', W - W') is kept on the sample's stack; later attempts take the stack's top
(interval and increment) before drawing anew.  Every increment a sample uses is then a piece of one
Brownian path whatever the decisions, and the solver converges to the SDE's law as the tolerance
tightens.

Per sample a stack of at most ``depth`` intervals: ``dts`` [depth, B] float64, ``incs`` [depth, B, D]
in the state's dtype, the height ``height`` [B] int64, and ``overflow`` (0-d int64), the rejections
that found no room (those redraw, as the authors' loop).  Static shapes, in-place updates, no host
reads: a captured attempt replays it.  The noise handed to the solver is standard normal,
zeta = W / sqrt(h), so its passes keep their coefficients g sqrt(h).
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_DEPTH = 16  # 2-D / 16-D Gaussians at rtol 1e-2: at most 9 kept intervals over 4000 samples


def start(batch: int, numel: int, depth: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Empty stacks: (dts [depth, B] float64, incs [depth, B, numel], height [B], overflow [])."""
    return (
        torch.zeros(depth, batch, dtype=torch.float64, device=device),
        torch.zeros(depth, batch, numel, dtype=dtype, device=device),
        torch.zeros(batch, dtype=torch.int64, device=device),
        torch.zeros((), dtype=torch.int64, device=device),
    )


def _at(stack: Tensor, slot: Tensor) -> Tensor:
    """stack[slot[b], b] for each sample b (an index of the stack's first dim, [1, B, ...])."""
    return slot.view(1, -1, *([1] * (stack.dim() - 2))).expand(1, *stack.shape[1:])


def take(
    h: Tensor, remaining: Tensor, fresh: Tensor, dts: Tensor, incs: Tensor, height: Tensor
) -> tuple[Tensor, Tensor]:
    """This attempt's step [B] and standard-normal noise [B, D]: where a sample keeps intervals, the
    top one (popped; its step capped at the time left, a rounding guard), else the controller's ``h``
    and the ``fresh`` draw."""
    kept = height > 0
    top = (height - 1).clamp(min=0)
    dt = dts.gather(0, _at(dts, top))[0]
    inc = incs.gather(0, _at(incs, top))[0]
    step = torch.where(kept, torch.minimum(dt, remaining), h)
    scale = torch.where(kept & (dt > 0), dt, 1.0).sqrt().to(fresh.dtype)
    noise = torch.where(kept[:, None], inc / scale[:, None], fresh)
    height.sub_(kept.to(height.dtype))
    return step, noise


def keep(
    rejected: Tensor,
    h: Tensor,
    h_next: Tensor,
    noise: Tensor,
    xi: Tensor,
    dts: Tensor,
    incs: Tensor,
    height: Tensor,
    overflow: Tensor,
) -> None:
    """After an attempt of step ``h`` [B] with standard-normal ``noise`` [B, D]: for each ``rejected``
    sample, split its increment W = sqrt(h) noise at the retry's step ``h_next`` by the Brownian bridge
    (``xi`` [B, D] standard normal) and push (h - h_next, W - W'), then (h_next, W') on top."""
    depth = dts.shape[0]
    fits = height + 2 <= depth
    push = rejected & fits
    full = rejected & ~fits
    overflow.add_(full.sum())
    height.masked_fill_(full, 0)  # no room: this sample drops its kept intervals and redraws (the authors' rule)
    safe_h = torch.where(h > 0, h, 1.0)
    q = (h_next / safe_h).clamp(0.0, 1.0)
    dt = noise.dtype
    w = noise * h.sqrt().to(dt)[:, None]
    first = torch.addcmul(w * q.to(dt)[:, None], xi, (q * (1.0 - q) * h).sqrt().to(dt)[:, None])
    for offset, d, v in ((0, h - h_next, w - first), (1, h_next, first)):
        slot = (height + offset).clamp(max=depth - 1)
        i2, i3 = _at(dts, slot), _at(incs, slot)
        dts.scatter_(0, i2, torch.where(push, d, dts.gather(0, i2)[0])[None])
        incs.scatter_(0, i3, torch.where(push[:, None], v, incs.gather(0, i3)[0])[None])
    height.add_(2 * push.to(height.dtype))
