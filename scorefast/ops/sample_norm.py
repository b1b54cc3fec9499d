"""``scorefast::sumsq_norms``: per-sample sums of squares in a fixed, batch-invariant order.

Row 0 is sum(t**2) of each sample, row 1 the same of the contract's normals z (made in-kernel,
never stored).  ``sample_norm`` is the public per-sample L2 norm that any sum feeding x or a step
decision goes through (DESIGN.md: torch's own reductions reorder with batch size and threads).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, backends
from . import _common


@torch.library.custom_op("scorefast::sumsq_norms", mutates_args=())
def sumsq_norms_op(
    t: Tensor | None,
    sample_ids: Tensor,
    seed: Tensor,
    step: Tensor,
    numel: int,
    stream: int,
    with_noise: bool,
    dtype: torch.dtype,
    backend: str,
) -> Tensor:
    """[2, B] in ``dtype`` (float64 only on the torch backend): sums of squares of t and of z."""
    _guard(t, sample_ids, numel)
    out = backends.get(backend).sumsq_norms(t, sample_ids, numel, seed, step, stream, with_noise, dtype)
    return out.to(dtype)


def _guard(t: Tensor | None, sample_ids: Tensor, numel: int) -> None:
    """Kernel entry guard: t is [B, numel] rows on the ids' device (a kernel reads B * numel values)."""
    _common.check_devices("sumsq_norms", sample_ids.device, t=t)
    _common.check_ids("sumsq_norms", sample_ids, sample_ids.shape[0] if sample_ids.dim() == 1 else -1)
    if t is not None and (t.dim() != 2 or t.shape[0] != sample_ids.shape[0] or t.shape[1] != numel):
        raise ValueError(f"sumsq_norms: t must be [{sample_ids.shape[0]}, {numel}] rows, got {tuple(t.shape)}")


@sumsq_norms_op.register_fake
def _(t, sample_ids, seed, step, numel, stream, with_noise, dtype, backend):
    _common.check_devices("sumsq_norms", sample_ids.device, t=t)
    return sample_ids.new_empty((2, sample_ids.shape[0]), dtype=dtype)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    (t,) = ctx.saved_tensors
    gt = None
    if t is not None and ctx.needs_input_grad[0]:
        gt = (2 * grad[0].to(t.dtype)[:, None] * t).to(t.dtype)
    return gt, None, None, None, None, None, None, None, None


sumsq_norms_op.register_autograd(_backward, setup_context=_setup_context)


def sample_sumsq(t: Tensor, *, backend: str | None = None) -> Tensor:
    """Per-sample sum of squares [B] of t [B, ...] in a fixed, batch-invariant tree."""
    _checks.check_float_tensor("t", t)
    B = _checks.check_batched("t", t)
    name = _common.resolve_backend(backend, t)
    ids = torch.zeros(B, dtype=torch.int64, device=t.device)
    t2 = _common.rows(t)
    return _sumsq(t2, ids, 0, 0, t2.shape[1], 0, False, _checks.state_dtype(t), name)[0]


def _sumsq(t2, ids, seed, step, numel, stream, with_noise, dtype, name) -> Tensor:
    """The op, or the backend directly for eager calls that autograd need not record."""
    if _checks.use_custom_op(t2):
        return sumsq_norms_op(
            t2, ids, _checks.counter_tensor(seed), _checks.counter_tensor(step), numel, stream, with_noise, dtype, name
        )
    _guard(t2, ids, numel)
    return backends.get(name).sumsq_norms(t2, ids, numel, seed, step, stream, with_noise, dtype).to(dtype)


def sample_norm(t: Tensor, *, backend: str | None = None) -> Tensor:
    """Per-sample L2 norm [B] of t [B, ...]: ||t_i|| summed in a fixed order (batch-invariant)."""
    return sample_sumsq(t, backend=backend).sqrt()


def noise_and_term_norms(
    t: Tensor | None,
    x: Tensor,
    *,
    seed,
    step,
    stream,
    sample_ids,
    backend: str | None = None,
    trusted: bool = False,
) -> tuple[Tensor, Tensor]:
    """(||t|| [B], ||z|| [B]) with z the normals of (seed, step, stream, sample_ids) shaped like x.

    ``trusted=True`` (samplers): ``backend`` is a resolved name and ``sample_ids`` checked ids.
    """
    sums = noise_and_term_sumsq(
        t, x, seed=seed, step=step, stream=stream, sample_ids=sample_ids, backend=backend, trusted=trusted
    )
    return sums[0].sqrt(), sums[1].sqrt()


def noise_and_term_sumsq(
    t: Tensor | None,
    x: Tensor,
    *,
    seed,
    step,
    stream,
    sample_ids,
    backend: str | None = None,
    trusted: bool = False,
) -> Tensor:
    """[2, B]: ||t||^2 and ||z||^2 per sample (``noise_and_term_norms`` before its square roots)."""
    B = _checks.check_batched("x", x)
    if trusted:
        name, c = backend, _common.Counter(seed, step, stream, sample_ids)
    else:
        _checks.check_float_tensor("x", x)
        name = _common.resolve_backend(backend, x)
        c = _common.counter(B, x.device, seed, step, stream, sample_ids)
    if t is not None and (
        type(t) is not Tensor or t.shape != x.shape or t.device != x.device or t.dtype not in _checks.FLOAT_DTYPES
    ):
        _checks.check_like("t", t, x)  # raises (a Tensor subclass of the right shape passes)
    t2 = _common.rows(t) if t is not None else None
    numel = x[0].numel() if B else 0
    return _sumsq(t2, c.sample_ids, c.seed, c.step, numel, c.stream, True, _checks.state_dtype(x), name)
