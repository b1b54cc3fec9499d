"""Score-matching losses: denoising (score_sde's ``get_sde_loss_fn``, EDM's), sliced and exact, and
flow matching (``fm_loss``, rectified flow's velocity).

Randomness follows the allocation table: training times t (or EDM's sigma) from stream 4, the
perturbation noise from stream 2, sliced-SM projections from stream 5 (element j*D + e), all at
Philox step ``step`` (the training step) with global ``sample_ids``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import _checks
from .ops import fused_update, sample_sumsq
from .rng import STREAM_DSM, STREAM_SLICED, STREAM_TIMES, rand, randn
from .sde import EDM, VESDE, VPSDE, RectifiedFlow, SubVPSDE
from .sde.base import SDE, bcast


def _perturb(x: Tensor, a: Tensor, std: Tensor, seed, step, ids: Tensor) -> Tensor:
    """x_t = a x + std z in one fused pass, z the stream-2 normals of (seed, step, ids) made in the kernel."""
    return fused_update(x, [], x_coef=a, noise=std, seed=seed, step=step, stream=STREAM_DSM, sample_ids=ids)


def _residual(out: Tensor, coef, other: Tensor | None, noise: float, seed, step, ids: Tensor) -> Tensor:
    """coef out (+ other) + noise z (state dtype) in one fused pass, z the stream-2 normals of
    (seed, step, ids): DSM's std s + z, flow matching's v + x_0 - z."""
    return fused_update(
        out.to(_checks.state_dtype(out)),
        [] if other is None else [(1.0, other)],
        x_coef=coef,
        noise=noise,
        seed=seed,
        step=step,
        stream=STREAM_DSM,
        sample_ids=ids,
    )


class _ResidualSq(torch.autograd.Function):
    """Per-sample ||coef out (+ other) + noise z||^2 [B]; backward regenerates the residual r by the
    fused kernel instead of keeping z (or r) alive between forward and backward: d/d out = 2 g coef r.
    Gradients flow to ``out`` only (coef, other: the loss's times and data)."""

    @staticmethod
    def forward(ctx, out: Tensor, coef, other: Tensor | None, noise: float, seed, step, ids: Tensor) -> Tensor:
        ctx.save_for_backward(out, coef if isinstance(coef, Tensor) else None, other, ids)
        ctx.meta = (coef if not isinstance(coef, Tensor) else None, noise, seed, step)
        with torch.no_grad():
            return sample_sumsq(_residual(out, coef, other, noise, seed, step, ids))

    @staticmethod
    def backward(ctx, grad: Tensor):
        out, coef_t, other, ids = ctx.saved_tensors
        coef, noise, seed, step = ctx.meta
        coef = coef_t if coef_t is not None else coef
        with torch.no_grad():
            r = _residual(out, coef, other, noise, seed, step, ids)
            g = bcast(2 * grad.to(r.dtype) * coef, r) * r
        return g.to(out.dtype), None, None, None, None, None, None


def _reduce(v: Tensor, reduce_mean: bool) -> Tensor:
    """Per-sample reduction over elements: mean (reduce_mean) or sum, as score_sde's reduce_op."""
    flat = v.flatten(1)
    return flat.mean(1) if reduce_mean else flat.sum(1)


def _times(sde: SDE, B: int, *, eps: float, seed, step, sample_ids, device) -> Tensor:
    """t ~ U(eps, T) per sample from stream 4 (float64 [B])."""
    u = rand(
        (B, 1), seed=seed, step=step, stream=STREAM_TIMES, sample_ids=sample_ids, device=device, dtype=torch.float64
    )[:, 0]
    return u * (sde.T - eps) + eps


def dsm_loss(
    score_fn: Callable,
    x: Tensor,
    sde: SDE,
    *,
    seed=0,
    step=0,
    sample_ids: Tensor | None = None,
    likelihood_weighting: bool = False,
    reduce_mean: bool = False,
    eps: float = 1e-5,
    return_per_sample: bool = False,
) -> Tensor:
    """Denoising score matching exactly as score_sde's ``get_sde_loss_fn`` (VE, VP, sub-VP).

    t ~ U(eps, T), z ~ N(0, I); x_t = mean(x, t) + std(t) z (one fused pass); per sample
    ||s(x_t, t) std + z||^2 (or, with likelihood_weighting, ||s + z / std||^2 g(t)^2), summed or
    averaged over elements, then averaged over the batch.  On EDM it is EDM's preconditioned loss
    (``edm_loss``).
    """
    _checks.check_float_tensor("x", x)
    B = _checks.check_batched("x", x)
    if isinstance(sde, EDM):
        return edm_loss(
            score_fn, x, sde, seed=seed, step=step, sample_ids=sample_ids, return_per_sample=return_per_sample
        )
    if not isinstance(sde, VESDE | VPSDE | SubVPSDE):
        raise ValueError(
            f"sde: dsm_loss follows score_sde for VESDE, VPSDE and SubVPSDE (EDM: edm_loss), got {type(sde).__name__}"
        )
    eps = _checks.check_finite_scalar("eps", eps, positive=True)
    ids = _checks.check_sample_ids(sample_ids, B, x.device)
    t = _times(sde, B, eps=eps, seed=seed, step=step, sample_ids=ids, device=x.device)
    a, std = sde.mean_coef(t).to(x.dtype), sde.std(t).to(x.dtype)
    x_t = _perturb(x, a, std, seed, step, ids)
    score = score_fn(x_t, t.to(x.dtype))
    if score.shape != x.shape:
        raise ValueError(f"score_fn: returned shape {tuple(score.shape)} for x of shape {tuple(x.shape)}")
    # ||std s + z||^2 with z regenerated in-kernel, in forward and in backward (never stored)
    sq = _ResidualSq.apply(score, std.to(_checks.state_dtype(x)), None, 1.0, seed, step, ids)
    if likelihood_weighting:  # ||s + z / std||^2 g^2 = ||std s + z||^2 g^2 / std^2
        sq = sq * (sde.diffusion(t) ** 2 / sde.std(t) ** 2).to(sq.dtype)
    losses = sq / x[0].numel() if reduce_mean else sq
    return losses if return_per_sample else losses.mean()


T_DISTS = ("uniform", "logit_normal")


def fm_loss(
    velocity_fn: Callable,
    x: Tensor,
    sde: RectifiedFlow,
    *,
    seed=0,
    step=0,
    sample_ids: Tensor | None = None,
    t_dist: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    reduce_mean: bool = False,
    return_per_sample: bool = False,
) -> Tensor:
    """Flow matching (rectified flow) as SD3 trains it: E ||v(x_t, t) - (z - x_0)||^2.

    u from stream 4: uniform in [0, 1) (``t_dist="uniform"``) or SD3's logit-normal u = sigmoid(
    logit_mean + logit_std n); t = the SDE's shift of u (as diffusers' training scripts take the
    scheduler's shifted sigmas; shift 1: t = u).  x_t = (1 - t) x_0 + t z with z from stream 2 (one
    fused pass); per sample ||v - z + x_0||^2 summed (or, ``reduce_mean``, averaged) over elements,
    then averaged over the batch.  The residual is regenerated in backward, never stored.
    ``velocity_fn(x_t, t)`` returns the velocity (``sf.adapters.from_velocity(net, sde).output``).
    """
    _checks.check_float_tensor("x", x)
    B = _checks.check_batched("x", x)
    if not isinstance(sde, RectifiedFlow):
        raise ValueError(f"sde: fm_loss trains a RectifiedFlow, got {type(sde).__name__}")
    if t_dist not in T_DISTS:
        raise ValueError(f"t_dist: expected one of {', '.join(T_DISTS)}, got {t_dist!r}")
    logit_mean = _checks.check_finite_scalar("logit_mean", logit_mean)
    logit_std = _checks.check_finite_scalar("logit_std", logit_std, positive=True)
    ids = _checks.check_sample_ids(sample_ids, B, x.device)
    draw = rand if t_dist == "uniform" else randn
    u = draw((B, 1), seed=seed, step=step, stream=STREAM_TIMES, sample_ids=ids, device=x.device, dtype=torch.float64)
    u = u[:, 0] if t_dist == "uniform" else torch.sigmoid(logit_mean + logit_std * u[:, 0])
    t = sde.shift_time(u)
    x_t = _perturb(x, sde.mean_coef(t).to(x.dtype), sde.std(t).to(x.dtype), seed, step, ids)  # (1 - t) x + t z
    v = velocity_fn(x_t, t.to(x.dtype))
    if not isinstance(v, Tensor) or v.shape != x.shape:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"velocity_fn: returned {shape} for x of shape {tuple(x.shape)}")
    # ||v + x - z||^2 with z regenerated in-kernel, in forward and in backward
    sq = _ResidualSq.apply(v, 1.0, x.to(_checks.state_dtype(x)), -1.0, seed, step, ids)
    losses = sq / x[0].numel() if reduce_mean else sq
    return losses if return_per_sample else losses.mean()


def edm_loss(
    score_fn: Callable,
    x: Tensor,
    sde: EDM,
    *,
    seed=0,
    step=0,
    sample_ids: Tensor | None = None,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    return_per_sample: bool = False,
) -> Tensor:
    """EDM's loss (Karras et al. 2022): ln sigma ~ N(p_mean, p_std^2) (stream 4), y = x + sigma n
    (stream 2), D(y) = y + sigma^2 s(y, sigma), weight (sigma^2 + sd^2) / (sigma sd)^2, ||D(y) - x||^2
    summed over elements, averaged over the batch."""
    _checks.check_float_tensor("x", x)
    B = _checks.check_batched("x", x)
    ids = _checks.check_sample_ids(sample_ids, B, x.device)
    n = randn((B, 1), seed=seed, step=step, stream=STREAM_TIMES, sample_ids=ids, device=x.device, dtype=torch.float64)[
        :, 0
    ]
    sigma = torch.exp(p_mean + p_std * n)
    sd = sde.sigma_data
    weight = ((sigma**2 + sd**2) / (sigma * sd) ** 2).to(x.dtype)
    y = fused_update(x, [], noise=sigma.to(x.dtype), seed=seed, step=step, stream=STREAM_DSM, sample_ids=ids)
    denoised = y + bcast(sigma**2, x) * score_fn(y, sigma.to(x.dtype))
    losses = weight * _reduce(torch.square(denoised - x), reduce_mean=False)
    return losses if return_per_sample else losses.mean()


def ssm_loss(
    score_fn: Callable,
    x: Tensor,
    *,
    n_projections: int = 1,
    seed=0,
    step=0,
    sample_ids: Tensor | None = None,
    t: Tensor | None = None,
    ad: str = "auto",
    return_per_sample: bool = False,
) -> Tensor:
    """Sliced score matching, variance-reduced (Song et al. 2019): v^T (ds/dx) v + ||s||^2 / 2 per
    sample, averaged over ``n_projections`` Gaussian projections v from stream 5 (element j*D + e).

    ``ad="jvp"`` gets (ds/dx) v by forward-mode AD (one dual forward per projection, gradients to
    the parameters flow through it); ``"vjp"`` by double backward; ``"auto"`` tries the JVP and
    falls back to the VJP for layers without forward-AD formulas.  ``t`` (optional, [B]) is
    passed to score_fn as its time argument.
    """
    _checks.check_float_tensor("x", x)
    B = _checks.check_batched("x", x)
    if isinstance(n_projections, bool) or not isinstance(n_projections, int) or n_projections < 1:
        raise ValueError(f"n_projections: must be an int >= 1, got {n_projections!r}")
    if ad not in ("auto", "jvp", "vjp"):
        raise ValueError(f"ad: expected 'auto', 'jvp' or 'vjp', got {ad!r}")
    ids = _checks.check_sample_ids(sample_ids, B, x.device)
    D = x[0].numel()
    v = (
        randn(
            (B, n_projections * D),
            seed=seed,
            step=step,
            stream=STREAM_SLICED,
            sample_ids=ids,
            device=x.device,
            dtype=x.dtype,
        )
        .reshape(B, n_projections, *x.shape[1:])
        .transpose(0, 1)
    )
    call = _bind_time(score_fn, t)
    if ad != "vjp":
        try:
            total = _ssm_jvp(call, x.detach(), v)
        except (NotImplementedError, RuntimeError) as err:
            if ad == "jvp":
                raise
            if "forward AD" not in str(err) and "forward-mode" not in str(err) and "jvp" not in str(err).lower():
                raise
            total = _ssm_vjp(call, x, v)
    else:
        total = _ssm_vjp(call, x, v)
    return total if return_per_sample else total.mean()


def _bind_time(score_fn: Callable, t: Tensor | None) -> Callable:
    """score_fn(y, t) as a function of y alone (score_fn(y) when no time is given)."""
    return (lambda y: score_fn(y, t)) if t is not None else score_fn


def _ssm_jvp(call: Callable, x: Tensor, v: Tensor) -> Tensor:
    import torch.autograd.forward_ad as fwAD

    total = 0.0
    for j, vj in enumerate(v):
        with fwAD.dual_level():
            out = call(fwAD.make_dual(x, vj))
            s, jv = fwAD.unpack_dual(out)
        if jv is None:  # the score does not depend on x
            jv = torch.zeros_like(s)
        if j == 0:
            total = 0.5 * (s * s).flatten(1).sum(1)
        total = total + (vj * jv).flatten(1).sum(1) / v.shape[0]
    return total


def _ssm_vjp(call: Callable, x: Tensor, v: Tensor) -> Tensor:
    xg = x.detach().requires_grad_(True)
    s = call(xg)
    total = 0.5 * (s * s).flatten(1).sum(1)
    for vj in v:
        (jv,) = torch.autograd.grad((s * vj).sum(), xg, create_graph=True)
        total = total + (vj * jv).flatten(1).sum(1) / v.shape[0]
    return total


def score_matching_loss(
    score_fn: Callable, x: Tensor, *, t: Tensor | None = None, return_per_sample: bool = False
) -> Tensor:
    """Exact score matching (Hyvärinen 2005): tr(ds/dx) + ||s||^2 / 2 per sample, D VJPs (small D)."""
    _checks.check_float_tensor("x", x)
    B = _checks.check_batched("x", x)
    D = x[0].numel()
    xg = x.detach().requires_grad_(True)
    s = _bind_time(score_fn, t)(xg)
    flat = s.reshape(B, D)
    trace = 0.0
    for i in range(D):
        (g,) = torch.autograd.grad(flat[:, i].sum(), xg, create_graph=True)
        trace = trace + g.reshape(B, D)[:, i]
    total = trace + 0.5 * (flat * flat).sum(1)
    return total if return_per_sample else total.mean()
