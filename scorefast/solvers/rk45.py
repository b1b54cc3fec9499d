"""Dormand–Prince RK5(4) with per-sample time, step size and accept/reject, on the device.

Every sample integrates dy/dt = fn(y, t) from its own t0 to t1 with its own step size; a step is
accepted where the scaled error norm is <= 1 (masked update), so samples never wait on or
influence each other: a sample's trajectory, step sequence and NFE do not depend on the batch.
The error norm goes through ``sf.ops.sample_sumsq`` (fixed summation order, DESIGN.md).  The
loop ends when every sample reached t1 (one host read per attempt, or per block of replays when
an attempt is captured as a CUDA graph).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops import sample_sumsq

C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
B5 = A[6] + (0.0,)
B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
ERR = tuple(b5 - b4 for b5, b4 in zip(B5, B4))
SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0


@dataclass
class Solution:
    y: Tensor  # [B, ...] at t1
    nfe: Tensor  # [B] int64: evaluations each sample took part in while active
    steps: Tensor  # [B] accepted steps
    rejected: Tensor  # [B] rejected steps


def _col(v: Tensor, y: Tensor) -> Tensor:
    """[B] -> [B, 1, ...]: y's dtype for coefficients, kept bool for masks."""
    v = v if v.dtype == torch.bool else v.to(y.dtype)
    return v.reshape(-1, *([1] * (y.dim() - 1)))


def _combine(y: Tensor, h: Tensor, ks: list[Tensor], coefs) -> Tensor:
    out = y
    for c, k in zip(coefs, ks):
        if c != 0.0:
            out = out + _col(h * c, y) * k
    return out


def _eager_attempts(body, carry, start, stop, *, done):
    for n in range(start, stop):
        if done(carry):
            break
        carry = body(n, *carry)
    return carry


def solve(
    fn: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    t0,
    t1,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    h0: float | None = None,
    max_steps: int = 100_000,
    backend: str | None = None,
    attempts: Callable | None = None,
) -> Solution:
    """Integrate dy/dt = fn(y, t [B] float64) from t0 to t1 (floats or [B]); y0 [B, ...].

    Error control per sample: RMS over elements of err / (atol + rtol * max(|y|, |y_new|)) <= 1.
    ``attempts`` runs the step attempts: ``attempts(body, carry, 0, max_steps, done=done)`` with
    ``carry = body(n, *carry)`` (default: a loop that reads ``done`` on the host before each
    attempt; a sampler's ``Context.steps`` captures one attempt, all six stages, as a CUDA graph).
    An attempt after every sample finished changes nothing.
    """
    for name, v in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(v, int | float) and v > 0):
            raise ValueError(f"{name}: must be a positive number, got {v!r}")
    B = y0.shape[0]
    dev = y0.device
    t = torch.as_tensor(t0, dtype=torch.float64, device=dev).reshape(-1).expand(B).clone()
    t_end = torch.as_tensor(t1, dtype=torch.float64, device=dev).reshape(-1).expand(B)
    direction = torch.sign(t_end - t)
    span = (t_end - t).abs()
    h = span * (0.01 if h0 is None else float(h0))
    D = y0[0].numel() if B else 1
    nfe = torch.ones(B, dtype=torch.int64, device=dev)
    k1 = fn(y0, t)

    def still_active(t: Tensor) -> Tensor:  # [B] bool: samples that have not reached t1
        return (t_end - t) * direction > 0

    def attempt(_n, y, k1, t, h, nfe, steps, rejected):
        """One Dormand–Prince attempt for every sample (functional: a trace may run it)."""
        active = still_active(t)
        h = torch.where(active, torch.minimum(h, (t_end - t).abs()), torch.zeros_like(h))
        hs = h * direction
        ks = [k1]
        for i in range(1, 7):
            yi = _combine(y, hs, ks, A[i])
            ks.append(fn(yi, t + C[i] * hs))
        nfe = nfe + 6 * active.long()
        y_new = _combine(y, hs, ks[:6], B5[:6])  # = ks[6]'s state (FSAL)
        err = _combine(torch.zeros_like(y), hs, ks, ERR)
        scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        err_norm = (sample_sumsq(err / scale, backend=backend).double() / D).sqrt()
        accept = active & (err_norm <= 1.0)
        y = torch.where(_col(accept, y), y_new, y)
        k1 = torch.where(_col(accept, y), ks[6], k1)
        t = torch.where(accept, torch.where((t_end - (t + hs)) * direction <= 0, t_end, t + hs), t)
        steps = steps + accept.long()
        rejected = rejected + (active & ~accept).long()
        factor = (SAFETY * err_norm.clamp_min(1e-10) ** -0.2).clamp(MIN_FACTOR, MAX_FACTOR)
        factor = torch.where(accept, factor, factor.clamp(max=1.0))
        h = torch.where(active, h * factor, h)
        return y, k1, t, h, nfe, steps, rejected

    def done(carry) -> bool:  # one host read
        return not bool(still_active(carry[2]).any())

    zeros = torch.zeros_like(nfe)
    carry = (y0, k1, t, h, nfe, zeros, zeros.clone())
    carry = (attempts or _eager_attempts)(attempt, carry, 0, max_steps, done=done)
    if not done(carry):
        raise RuntimeError(f"max_steps: rk45 did not reach t1 within {max_steps} steps")
    y, _, _, _, nfe, steps, rejected = carry
    return Solution(y, nfe, steps, rejected)
