"""Langevin corrector with a signal-to-noise step size (score_sde's ``LangevinCorrector``).

Pass 1 takes ||score||^2 and ||z||^2 per sample (z made in-kernel, never stored, fixed-order sums);
eps = 2*alpha*snr**2 * ||z||^2/||score||^2; pass 2 regenerates z: x + eps*score + sqrt(2*eps)*z.
``norm="batch"`` averages the norms over the batch first, as score_sde and diffusers do.

``norm="sample"`` without gradients runs ``scorefast::snr_langevin_step``: one kernel on CUDA for
samples of up to 8192 elements (norms, step size and update, z regenerated in registers), a few
launches otherwise, never a torch op between them.  It takes alpha from a per-run table read at the
device step counter ``row``, makes the Philox step ``n * draws + draw`` in-kernel and sets a
non-finite flag, as ``fused_update_table`` does.  With gradients, or ``norm="batch"``, the op is
composed of ``sumsq_norms`` and ``fused_update`` (autograd flows through both).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, backends
from . import _common
from .fused_update import _as_rows, _check_out, apply, check_step_args, refuse_grad_on_step
from .sample_norm import noise_and_term_sumsq

NORMS = ("sample", "batch")


def _run(out, eps, x, score, alpha, row, two_snr2, seed, step, draws, draw, stream, sample_ids, flag, backend) -> None:
    if backend != "torch" and alpha is not None and row is None:
        alpha = alpha.to(torch.float32).reshape(-1).contiguous()
    backends.get(backend).snr_langevin_step(
        out, eps, x, score, alpha, two_snr2, sample_ids, seed, step, stream, row=row, draws=draws, draw=draw, flag=flag
    )


def _eps_like(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[0],), dtype=_checks.state_dtype(x))


@torch.library.custom_op("scorefast::snr_langevin_step", mutates_args=("flag",))
def snr_langevin_step_op(
    x: Tensor,
    score: Tensor,
    alpha: Tensor | None,
    row: Tensor | None,
    two_snr2: float,
    seed: Tensor,
    step: Tensor,
    draws: int,
    draw: int,
    stream: int,
    sample_ids: Tensor | None,
    flag: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(x_new, eps) for contiguous [B, D] x and score, per-sample norms.

    eps_b = (two_snr2 * alpha_b) * (|z_b|^2 / |score_b|^2) (0 where the score norm is 0), x_new = x +
    eps*score + sqrt(2 eps)*z.  alpha: None (1), [1] or [B]; with ``row`` (0-d int64, the device
    step counter) a fp32 table [N] read at that row.  Philox step ``step * draws + draw``;
    sample_ids None: arange(B); flag (0-d int64 holding -1) := step on a non-finite write.
    """
    out, eps = torch.empty_like(x), _eps_like(x)
    _run(out, eps, x, score, alpha, row, two_snr2, seed, step, draws, draw, stream, sample_ids, flag, backend)
    return out, eps


@snr_langevin_step_op.register_fake
def _(x, score, alpha, row, two_snr2, seed, step, draws, draw, stream, sample_ids, flag, backend):
    return torch.empty_like(x), _eps_like(x)


@torch.library.custom_op("scorefast::snr_langevin_step_out", mutates_args=("out", "flag"))
def snr_langevin_step_out_op(
    out: Tensor,
    x: Tensor,
    score: Tensor,
    alpha: Tensor | None,
    row: Tensor | None,
    two_snr2: float,
    seed: Tensor,
    step: Tensor,
    draws: int,
    draw: int,
    stream: int,
    sample_ids: Tensor | None,
    flag: Tensor | None,
    backend: str,
) -> Tensor:
    """As ``snr_langevin_step`` but writes x_new into ``out`` (may be x); returns eps."""
    eps = _eps_like(x)
    _run(out, eps, x, score, alpha, row, two_snr2, seed, step, draws, draw, stream, sample_ids, flag, backend)
    return eps


@snr_langevin_step_out_op.register_fake
def _(out, x, score, alpha, row, two_snr2, seed, step, draws, draw, stream, sample_ids, flag, backend):
    return _eps_like(x)


def snr_langevin_step(
    x: Tensor,
    score: Tensor,
    snr: float,
    *,
    alpha: float | Tensor = 1.0,
    norm: str = "sample",
    seed: int | Tensor,
    step: int | Tensor | None = None,
    stream: int = 0,
    sample_ids: Tensor | None = None,
    out: Tensor | None = None,
    backend: str | None = None,
    row: Tensor | None = None,
    draws: int = 1,
    draw: int = 0,
    flag: Tensor | None = None,
    _trusted: bool = False,
) -> tuple[Tensor, Tensor]:
    """Returns (x_new [B, ...], eps [B]).  A zero score gives eps = 0 (x unchanged), not NaN.

    The step counter n is ``step`` (int or 0-d int64 tensor), or ``row`` when step is omitted; the
    Philox step is ``n * draws + draw``.  With ``row`` (0-d int64 tensor on x's device), ``alpha``
    is a per-run float32 table [N] read at that row by the kernel.  ``flag``: a 0-d int64 tensor
    holding -1, set to n if a value written is not finite (no gradients with a flag).
    """
    B = x.shape[0]
    if not _trusted:
        _validate(x, score, snr, alpha, norm, row)
        check_step_args(x, row, draws, draw, flag)
    elif type(score) is not Tensor or score.shape != x.shape or score.device != x.device:
        _checks.check_like("score", score, x)  # the trusted (sampler) path's one cheap check
    if step is None:
        if row is None:
            raise TypeError("step: required unless row (the device step counter) is given")
        step = row
    grad = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (x, score, alpha))
    if norm == "sample" and not grad:
        return _fused(
            x, score, snr, alpha, seed, step, stream, sample_ids, out, backend, row, draws, draw, flag, _trusted
        )
    if row is not None:  # composed: the table's row and the Philox step as (glue) tensor ops
        alpha = alpha.index_select(0, row.reshape(1).to(alpha.device))
    if (draws, draw) != (1, 0):
        step = step * draws + draw if isinstance(step, Tensor) else int(step) * draws + draw
    sums = noise_and_term_sumsq(
        score, x, seed=seed, step=step, stream=stream, sample_ids=sample_ids, backend=backend, trusted=_trusted
    )
    if norm == "batch":  # the batch means of the norms (not of their squares), as score_sde
        sums = sums.sqrt().mean(1, keepdim=True).square().expand(2, B)
    g2, z2 = sums[0], sums[1]
    # eps = 2 alpha snr^2 ||z||^2 / ||score||^2, from the squared norms (no square roots); the inner
    # where keeps the gradient finite where the score is zero (eps = 0 there)
    scored = g2 > 0
    eps = torch.where(scored, (2.0 * snr * snr) * alpha * (z2 / torch.where(scored, g2, 1.0)), 0.0)
    x_new = apply(
        x,
        [(eps, score)],
        noise=torch.sqrt(2.0 * eps),
        seed=seed,
        step=step,
        stream=stream,
        sample_ids=sample_ids,
        x_coef=1.0,
        out=out,
        backend=backend,
        op="snr_langevin_step",
        trusted=_trusted,
        flag=flag,
    )
    return x_new, eps


def _fused(x, score, snr, alpha, seed, step, stream, sample_ids, out, backend, row, draws, draw, flag, trusted):
    """The per-sample corrector through ``scorefast::snr_langevin_step`` (or its backend, eagerly)."""
    if trusted:
        name = backend
    else:
        name = _common.resolve_backend(backend, x)
        seed = _checks.check_counter("seed", seed, x.device, upper=_checks.UINT64)
        if step is not row:  # a row was checked with the step arguments (its value is not read)
            step = _checks.check_counter("step", step, x.device, upper=_checks.UINT32)
        stream = _checks.check_stream(stream)
        if sample_ids is not None:
            sample_ids = _checks.check_sample_ids(sample_ids, x.shape[0], x.device)
        if out is not None:
            _check_out(out, x)
    if isinstance(alpha, Tensor):
        two_snr2, alpha_t = 2.0 * snr * snr, alpha
    else:  # a number: folded into the constant, rounded as the composed op rounds it
        two_snr2, alpha_t = 2.0 * snr * snr * alpha, None
    x2, s2 = _as_rows(x), _as_rows(score)
    refuse_grad_on_step("snr_langevin_step", out)
    if _checks.use_custom_op(x2, s2):
        args = (alpha_t, row, two_snr2, _checks.counter_tensor(seed), _checks.counter_tensor(step))
        rest = (draws, draw, stream, sample_ids, flag, name)
        if out is None:
            new, eps = snr_langevin_step_op(x2, s2, *args, *rest)
            return (new if new.shape == x.shape else new.view(x.shape)), eps
        eps_box = []
        _common.into_rows(out, lambda rows: eps_box.append(snr_langevin_step_out_op(rows, x2, s2, *args, *rest)))
        return out, eps_box[0]
    eps = _eps_like(x)
    target = out if out is not None else torch.empty_like(x)
    _common.into_rows(
        target,
        lambda rows: _run(
            rows, eps, x2, s2, alpha_t, row, two_snr2, seed, step, draws, draw, stream, sample_ids, flag, name
        ),
    )
    return target, eps


def _validate(x, score, snr, alpha, norm, row=None) -> None:
    _checks.check_float_tensor("x", x)
    B = _checks.check_batched("x", x)
    snr = _checks.check_finite_scalar("snr", snr, positive=True)
    if row is None:
        alpha = _checks.check_coef("alpha", alpha, B, x.device, positive=True)
    else:
        _check_alpha_table(alpha, x)
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
    _checks.check_like("score", score, x)


def _check_alpha_table(alpha, x: Tensor) -> None:
    """With a row, alpha is a per-run table [N] on x's device (its values are not read: no sync)."""
    wanted = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not isinstance(alpha, Tensor) or alpha.dtype != wanted:
        got = f"{alpha.dtype} tensor" if isinstance(alpha, Tensor) else type(alpha).__name__
        raise TypeError(f"alpha: with row, expected a {wanted} table [N] (one alpha per step), got {got}")
    if alpha.dim() != 1 or alpha.shape[0] < 1:
        raise ValueError(f"alpha: with row, expected a table [N], got shape {tuple(alpha.shape)}")
    if alpha.device != x.device:
        raise ValueError(f"alpha: on {alpha.device}, but x is on {x.device}")
