"""Score-matching losses: denoising (score_sde's ``get_sde_loss_fn``, EDM's), sliced and exact.

Randomness follows the allocation table: training times t (or EDM's sigma) from stream 4, the
perturbation noise from stream 2, sliced-SM projections from stream 5 (element j*D + e), all at
Philox step ``step`` (the training step) with global ``sample_ids``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import _checks, backends
from .ops import _common, fused_update, sample_sumsq
from .ops.fused_update import apply as apply_update
from .ops.noise import noise_op
from .rng import KINDS, STREAM_DSM, STREAM_SLICED, STREAM_TIMES, rand, randn
from .sde import EDM, VESDE, VPSDE, RectifiedFlow, SubVPSDE
from .sde.base import SDE, bcast

# Eager calls without autograd, tracing or fx capture go straight to the backend's kernels (the
# interface every backend exposes, as ops/fused_update's own shortcut does); otherwise the ops.
_COEFS: dict[tuple, Tensor] = {}


def _coefs(x_coef: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The [2, 1] coefficient rows (x_coef, noise 1) of the kernels, made once per device and dtype."""
    key = (x_coef, device, dtype)
    if key not in _COEFS:
        _COEFS[key] = torch.tensor([[x_coef], [1.0]], dtype=dtype, device=device)
    return _COEFS[key]


def _update_rows(x2: Tensor, coefs: Tensor, seed, step, ids: Tensor, backend: str) -> Tensor:
    """coefs[0] x2 + coefs[1] z for contiguous rows x2 [B, D], z the stream-2 normals, by the kernel."""
    out = torch.empty_like(x2)
    backends.get(backend).fused_update(out, x2, [], coefs, ids, seed, step, STREAM_DSM, True)
    return out


def _rows_sumsq(r: Tensor, ids: Tensor, backend: str) -> Tensor:
    """Per-sample sum of squares [B] of r [B, ...] in the fixed, batch-invariant tree."""
    r2 = r if r.dim() == 2 else r.reshape(r.shape[0], -1)
    if _checks.use_custom_op(r2) or not r2.is_contiguous():
        return sample_sumsq(r, backend=backend)
    dtype = _checks.state_dtype(r)
    return backends.get(backend).sumsq_norms(r2, ids, r2.shape[1], 0, 0, 0, False, dtype).select(0, 0).to(dtype)


def _noise_plus(v: Tensor, coef: float | Tensor, seed, step, ids: Tensor, backend: str) -> Tensor:
    """coef v + z (state dtype) in one fused pass, z the stream-2 normals of (seed, step, ids)."""
    v = v.to(_checks.state_dtype(v))
    if isinstance(coef, float) and v.is_contiguous() and not _checks.use_custom_op(v):
        v2 = v if v.dim() == 2 else v.view(v.shape[0], -1)
        r = _update_rows(v2, _coefs(coef, v.device, v.dtype), seed, step, ids, backend)
        return r if v.dim() == 2 else r.view(v.shape)
    return apply_update(
        v,
        [],
        x_coef=coef,
        noise=1.0,
        seed=seed,
        step=step,
        stream=STREAM_DSM,
        sample_ids=ids,
        out=None,
        backend=backend,
        trusted=True,
    )


def _regenerated_residual_sq(residual: Callable, scaled: bool, name: str, doc: str) -> type:
    """An autograd Function out, aux -> per-sample ||r||^2 [B] with r = residual(out, aux, seed, step,
    ids, backend) made by the fused kernel (z regenerated from its counter) in forward and again in
    backward, never kept alive between them.  d/d out = 2 g r, times aux per sample when ``scaled``
    (r = aux out + z).  Gradients flow to ``out`` only."""

    class ResidualSq(torch.autograd.Function):
        @staticmethod
        def forward(ctx, out: Tensor, aux: Tensor, seed, step, ids: Tensor, backend: str) -> Tensor:
            ctx.save_for_backward(out, aux, ids)
            ctx.counter = (seed, step, backend)
            with torch.no_grad():
                return _rows_sumsq(residual(out, aux, seed, step, ids, backend), ids, backend)

        @staticmethod
        def backward(ctx, grad: Tensor):
            out, aux, ids = ctx.saved_tensors
            seed, step, backend = ctx.counter
            with torch.no_grad():
                r = residual(out, aux, seed, step, ids, backend)
                weight = 2 * grad.to(r.dtype) * aux if scaled else 2 * grad.to(r.dtype)
                g = bcast(weight, r) * r
            return g.to(out.dtype), None, None, None, None, None

    ResidualSq.__name__ = ResidualSq.__qualname__ = name
    ResidualSq.__doc__ = doc
    return ResidualSq


_DSMResidualSq = _regenerated_residual_sq(
    _noise_plus,
    True,
    "_DSMResidualSq",
    "Per-sample ||std s + z||^2 [B] (score, std [B]); backward regenerates std s + z: d/ds = 2 g std (std s + z).",
)


class _EpsResidualSq(torch.autograd.Function):
    """Per-sample ||z - eps||^2 [B] for an eps-prediction network: std s + z with s = -eps / std is
    z - eps, so no schedule enters.  The residual r = z - eps (one fused pass, z made in-kernel) is
    kept for backward, like an activation: d/d eps = -2 g r."""

    @staticmethod
    def forward(ctx, eps: Tensor, seed, step, ids: Tensor, backend: str) -> Tensor:
        with torch.no_grad():
            r = _noise_plus(eps, -1.0, seed, step, ids, backend)
        ctx.save_for_backward(r)
        ctx.eps_dtype = eps.dtype
        return _rows_sumsq(r, ids, backend)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (r,) = ctx.saved_tensors
        g = r * bcast(grad.to(r.dtype).mul(-2.0), r)
        return g.to(ctx.eps_dtype), None, None, None, None


def _reduce(v: Tensor, reduce_mean: bool) -> Tensor:
    """Per-sample reduction over elements: mean (reduce_mean) or sum, as score_sde's reduce_op."""
    flat = v.flatten(1)
    return flat.mean(1) if reduce_mean else flat.sum(1)


def _uniforms(B: int, *, seed, step, stream: int, ids: Tensor, backend: str) -> Tensor:
    """[B] fp32 uniforms of element 0 (checked ids, resolved fp32 backend: no host reads).  Their float64
    values are exactly the contract's float64 uniforms (the reference maps fp32 uniforms to float64)."""
    if _checks.use_custom_op():  # tracing or recording: through the op
        seed_t, step_t = _checks.counter_tensor(seed), _checks.counter_tensor(step)
        return noise_op(ids, seed_t, step_t, 1, stream, 0, KINDS["uniform"], torch.float32, backend)[:, 0]
    out = torch.empty(B, dtype=torch.float32, device=ids.device)
    backends.get(backend).fill_noise(out.view(B, 1), ids, seed, step, stream, 0, KINDS["uniform"])
    return out


def _times(sde: SDE, B: int, *, eps: float, seed, step, sample_ids, backend: str) -> Tensor:
    """t ~ U(eps, T) per sample from stream 4 (float64 [B])."""
    u = _uniforms(B, seed=seed, step=step, stream=STREAM_TIMES, ids=sample_ids, backend=backend)
    return u.to(torch.float64) * (sde.T - eps) + eps


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
    c = _common.counter(B, x.device, seed, step, STREAM_DSM, sample_ids)
    losses = dsm_per_sample(
        score_fn,
        x,
        sde,
        seed=c.seed,
        step=c.step,
        sample_ids=c.sample_ids,
        likelihood_weighting=likelihood_weighting,
        reduce_mean=reduce_mean,
        eps=eps,
        backend=backends.resolve(None, x.device, x.dtype),
    )
    return losses if return_per_sample else losses.mean()


def _perturb(x: Tensor, sde: SDE, *, eps: float, seed, step, sample_ids: Tensor, backend: str):
    """(t float64 [B], std [B] in x's dtype, x_t = a x + std z) with t ~ U(eps, T) from stream 4 and z from
    stream 2 made in-kernel (VP and sub-VP fp32 rows on the cpu backend: one C++ call)."""
    fused = _fused_vp_perturb(x, sde, eps=eps, seed=seed, step=step, sample_ids=sample_ids, backend=backend)
    if fused is not None:
        return fused
    t = _times(sde, x.shape[0], eps=eps, seed=seed, step=step, sample_ids=sample_ids, backend=backend)
    return (t, *_perturb_at(x, t, sde, seed=seed, step=step, sample_ids=sample_ids, backend=backend))


_SUB_VP = {VPSDE: False, SubVPSDE: True}  # the exact classes whose schedule the C++ call computes


def _vp_perturb_kernel():
    """The cpu backend's one-call VP perturbation, or None (a build older than it)."""
    return backends.get("cpu").kernel("dsm_perturb_vp")


def _run_vp_perturb(x2: Tensor, ids: Tensor, seed, step, *args) -> tuple[Tensor, Tensor, Tensor]:
    """(t, coefs, x_t) of contiguous fp32 CPU rows x2 [B, D] by the C++ call (``args``: sub_vp, beta_0,
    beta_d, eps, span); what the op and the eager path both run."""
    t, coefs, x_t = _vp_perturb_outputs(x2)
    _vp_perturb_kernel()(t, coefs, x_t, x2, ids, int(seed) % (1 << 64), int(step), *args,
                         STREAM_TIMES, STREAM_DSM, KINDS["uniform"])  # fmt: skip
    return t, coefs, x_t


@torch.library.custom_op("scorefast::dsm_perturb_vp_cpu", mutates_args=(), device_types="cpu")
def dsm_perturb_vp_op(
    x: Tensor, ids: Tensor, seed: Tensor, step: Tensor, sub_vp: bool, beta_0: float, beta_d: float, eps: float,
    span: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The C++ perturbation as a dispatched op (what a trace or the capture stand-in records):
    (t float64 [B], coefs float32 [2, B] (mean, std), x_t [B, D]) of contiguous fp32 CPU rows x."""
    return _run_vp_perturb(x, ids, seed, step, sub_vp, beta_0, beta_d, eps, span)


@dsm_perturb_vp_op.register_fake
def _(x, ids, seed, step, sub_vp, beta_0, beta_d, eps, span):
    return _vp_perturb_outputs(x)


def _vp_perturb_outputs(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    B = x.shape[0]
    return x.new_empty(B, dtype=torch.float64), x.new_empty(2, B), torch.empty_like(x)


def _fused_vp_perturb(x: Tensor, sde: SDE, *, eps: float, seed, step, sample_ids: Tensor, backend: str):
    """``_perturb``'s (t, std, x_t) by the cpu backend's one C++ call (``csrc/cpu/train_impl.h``): the
    same ops' arithmetic, libm's exp/expm1 for torch's vector ones (the same float32 coefficients but
    where a float64 last bit decides a rounding tie).  None where it does not apply: another backend,
    SDE or dtype, rows that are not contiguous or that need a gradient (the op has none: the torch
    path's x_t is differentiable in x), a build without it."""
    sub_vp = _SUB_VP.get(type(sde))
    if sub_vp is None or backend != "cpu" or x.dtype != torch.float32 or not x.is_contiguous():
        return None
    if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
        return None
    if _vp_perturb_kernel() is None:
        return None
    x2 = _common.rows(x)
    args = (sub_vp, sde.beta_0, sde.beta_1 - sde.beta_0, float(eps), float(sde.T - eps))
    if _checks.use_custom_op(x):
        seed_t, step_t = _checks.counter_tensor(seed), _checks.counter_tensor(step)
        t, coefs, x_t = dsm_perturb_vp_op(x2, sample_ids, seed_t, step_t, *args)
    else:
        t, coefs, x_t = _run_vp_perturb(x2, sample_ids, seed, step, *args)
    return t, coefs[1], x_t.view(x.shape)


# std from log_mean_coeff l for the SDEs whose mean_coef (exp l) and std share it: their own formulas
_STD_OF_LOG_MEAN: dict[type, Callable[[Tensor], Tensor]] = {
    VPSDE: lambda lmc: torch.sqrt(-torch.expm1(2.0 * lmc)),  # VPSDE.std
    SubVPSDE: lambda lmc: -torch.expm1(2.0 * lmc),  # SubVPSDE.std
}


def _mean_std(sde: SDE, t: Tensor) -> tuple[Tensor, Tensor]:
    """(sde.mean_coef(t), sde.std(t)), bit for bit; VP and sub-VP compute their log_mean_coeff once
    (the same ops on the same value), other SDEs call both methods."""
    std_of = _STD_OF_LOG_MEAN.get(type(sde))
    if std_of is None:
        return sde.mean_coef(t), sde.std(t)
    lmc = sde.log_mean_coeff(t)
    return torch.exp(lmc), std_of(lmc)


def _perturb_at(x: Tensor, t: Tensor, sde: SDE, *, seed, step, sample_ids: Tensor, backend: str):
    """(std [B] in x's dtype, x_t = mean_coef(t) x + std(t) z) at times t [B], z from stream 2 made in-kernel."""
    B = x.shape[0]
    if x.is_contiguous() and not _checks.use_custom_op(x):  # the [2, B] coefficient rows of x and z
        coefs = torch.stack(_mean_std(sde, t)).to(x.dtype)
        x2 = x if x.dim() == 2 else x.view(B, -1)
        x_t = _update_rows(x2, coefs.to(_checks.state_dtype(x)), seed, step, sample_ids, backend)
        return coefs[1], x_t if x.dim() == 2 else x_t.view(x.shape)
    a, std = sde.mean_coef(t).to(x.dtype), sde.std(t).to(x.dtype)
    x_t = apply_update(
        x,
        [],
        x_coef=a,
        noise=std,
        seed=seed,
        step=step,
        stream=STREAM_DSM,
        sample_ids=sample_ids,
        out=None,
        backend=backend,
        trusted=True,
    )
    return std, x_t


def dsm_per_sample(
    score_fn: Callable,
    x: Tensor,
    sde: SDE,
    *,
    seed,
    step,
    sample_ids: Tensor,
    likelihood_weighting: bool,
    reduce_mean: bool,
    eps: float,
    backend: str,
    eps_net: tuple[Callable, Callable] | None = None,
) -> Tensor:
    """``dsm_loss``'s per-sample losses [B] on checked arguments (``TrainStep``: ids it made itself, a
    resolved ``backend`` for x's dtype); reads nothing on the host, so a training step can be captured.

    ``eps_net=(net, time_map)``: score_fn is an eps-prediction network ``net(x, time_map(t))`` (score =
    -eps / std), whose residual std s + z is z - eps: one fused pass, no schedule, no division by std."""
    if eps_net is not None:
        t, out = _eps_output(*eps_net, x, sde, eps=eps, seed=seed, step=step, sample_ids=sample_ids, backend=backend)
        sq = _EpsResidualSq.apply(out, seed, step, sample_ids, backend)
    else:
        t, std, x_t = _perturb(x, sde, eps=eps, seed=seed, step=step, sample_ids=sample_ids, backend=backend)
        score = score_fn(x_t, t.to(x.dtype))
        if score.shape != x.shape:
            raise ValueError(f"score_fn: returned shape {tuple(score.shape)} for x of shape {tuple(x.shape)}")
        # ||std s + z||^2 with z regenerated in-kernel, in forward and in backward (never stored)
        sq = _DSMResidualSq.apply(score, std.to(_checks.state_dtype(x)), seed, step, sample_ids, backend)
    if likelihood_weighting:  # ||s + z / std||^2 g^2 = ||std s + z||^2 g^2 / std^2
        sq = sq * (sde.diffusion(t) ** 2 / sde.std(t) ** 2).to(sq.dtype)
    return sq / x[0].numel() if reduce_mean else sq


def _eps_output(net: Callable, time_map: Callable, x: Tensor, sde: SDE, *, eps: float, seed, step, sample_ids, backend):
    """(t float64 [B], out = net(x_t, time_map(t))) for an eps-prediction network at the step's times
    (stream 4) and perturbation x_t = mean_coef(t) x + std(t) z (stream 2, one fused pass)."""
    t, _, x_t = _perturb(x, sde, eps=eps, seed=seed, step=step, sample_ids=sample_ids, backend=backend)
    out = net(x_t, time_map(t).to(x.dtype))
    if out.shape != x.shape:
        raise ValueError(f"model: returned shape {tuple(out.shape)} for x of shape {tuple(x.shape)}")
    return t, out


def dsm_eps_output(
    net: Callable, time_map: Callable, x: Tensor, sde: SDE, *, seed, step, sample_ids: Tensor, eps: float, backend: str
) -> Tensor:
    """out = net(x_t, time_map(t)) [B, ...] with its graph: an eps-prediction network at the step's
    times and perturbation (``TrainStep``; its residual and gradient by ``dsm_eps_residual``)."""
    return _eps_output(net, time_map, x, sde, eps=eps, seed=seed, step=step, sample_ids=sample_ids, backend=backend)[1]


def dsm_eps_residual(out: Tensor, coef: float | Tensor, seed, step, sample_ids: Tensor, backend: str):
    """score_sde's DSM for an eps-prediction network's output, with no autograd node for the loss.

    Returns (sq [B], g): sq = ||r||^2 per sample of the residual r = z - out (the residual std s + z for
    s = -out / std; the fixed, batch-invariant tree; no graph), the values of ``dsm_per_sample(...,
    eps_net=...)``, and g = coef r in the state dtype.  d sq_b / d out = -2 r_b: a caller that
    backpropagates c_b sq_b passes coef = -2 c and calls ``out.backward(g)``, the gradient the
    autograd path gives bit for bit when c is computed as autograd computes it.  On the cpu backend,
    for fp32 rows and a host coef, one C++ pass makes both and r is never stored."""
    kernel = backends.get("cpu").kernel("eps_dsm_residual") if backend == "cpu" else None
    fused = kernel is not None and isinstance(coef, float) and out.dtype == torch.float32 and out.is_contiguous()
    if fused and out.device.type == "cpu" and not _checks.use_custom_op(out):
        o2 = _common.rows(out)
        g, sq = torch.empty_like(o2), torch.empty(out.shape[0], dtype=torch.float32)
        kernel(g, sq, o2, sample_ids, int(seed) % (1 << 64), int(step), STREAM_DSM, coef)
        return sq, g.view(out.shape)
    r = _noise_plus(out, -1.0, seed, step, sample_ids, backend)
    return _rows_sumsq(r, sample_ids, backend), r.mul(coef)


def _fm_residual(v: Tensor, x0: Tensor, seed, step, ids: Tensor, backend: str) -> Tensor:
    """v + x_0 - z (state dtype) in one fused pass, z the stream-2 normals of (seed, step, ids)."""
    return apply_update(
        v.to(_checks.state_dtype(v)),
        [(1.0, x0)],
        x_coef=1.0,
        noise=-1.0,
        seed=seed,
        step=step,
        stream=STREAM_DSM,
        sample_ids=ids,
        out=None,
        backend=backend,
        trusted=True,
    )


_FMResidualSq = _regenerated_residual_sq(
    _fm_residual,
    False,
    "_FMResidualSq",
    "Per-sample ||v + x_0 - z||^2 [B] (flow matching's residual v - (z - x_0); v, x_0); d/dv = 2 g r.",
)


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
    c = _common.counter(B, x.device, seed, step, STREAM_DSM, sample_ids)
    backend = backends.resolve(None, x.device, x.dtype)
    draw = rand if t_dist == "uniform" else randn
    u = draw(
        (B, 1), seed=seed, step=step, stream=STREAM_TIMES, sample_ids=c.sample_ids, device=x.device, dtype=torch.float64
    )
    u = u[:, 0] if t_dist == "uniform" else torch.sigmoid(logit_mean + logit_std * u[:, 0])
    t = sde.shift_time(u)
    _, x_t = _perturb_at(x, t, sde, seed=c.seed, step=c.step, sample_ids=c.sample_ids, backend=backend)
    v = velocity_fn(x_t, t.to(x.dtype))
    if not isinstance(v, Tensor) or v.shape != x.shape:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"velocity_fn: returned {shape} for x of shape {tuple(x.shape)}")
    sq = _FMResidualSq.apply(v, x.to(_checks.state_dtype(x)), c.seed, c.step, c.sample_ids, backend)
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
