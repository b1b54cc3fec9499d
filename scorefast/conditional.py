"""Conditional generation: inpainting and colorisation (score_sde's controllable generation) and guidance.

``inpaint`` / ``colorize`` run any step-based sampler and, after each step, replace the known part
of the state by the data noised to the time the state has reached: mean(t) + std(t) z, with z one
extra declared draw per step (DESIGN.md: stream 0, k = n*S + j).  After the last step the known
part is the data itself.  (score_sde re-noises to the step's start time t_n; at its 1000 steps
that is the same, and at the few steps of ODE samplers t_{n+1} is the right time.)  Replacement
conditioning is exact in law when the known and unknown parts are independent; on correlated data
it is biased towards the prior (the known part is re-noised independently of the unknown part).

``guided`` wraps a score function with classifier guidance and/or classifier-free guidance; it
works with any sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from . import _checks
from .sampling import sample

UNSUPPORTED = ("rk45", "langevin")

# score_sde's orthogonal colour decoupling: channel 0 of x @ M is the (scaled) grey level.
DECOUPLE = torch.tensor(
    [
        [5.7735014e-01, -8.1649649e-01, 4.7008697e-08],
        [5.7735026e-01, 4.0824834e-01, 7.0710671e-01],
        [5.7735026e-01, 4.0824822e-01, -7.0710683e-01],
    ],
    dtype=torch.float64,
)


class _Replace:
    """Projection x <- x (1 - mask) + noised(data) mask, in an optional orthogonal channel basis."""

    def __init__(self, data: Tensor, mask: Tensor, basis: Tensor | None = None):
        self.data, self.mask, self.basis = data, mask, basis
        self._noising = None  # (the run's Context, its per-step (mean_coef, std) table)

    def _to(self, x: Tensor) -> Tensor:
        if self.basis is None:
            return x
        return torch.einsum("bi...,ij->bj...", x, self.basis.to(x))

    def _from(self, x: Tensor) -> Tensor:
        if self.basis is None:
            return x
        return torch.einsum("bj...,ij->bi...", x, self.basis.to(x))

    def __call__(self, ctx, x: Tensor, n, t) -> Tensor:
        known = self._to(self.data)
        if self._noising is None or self._noising[0] is not ctx:
            # known noised to t_{n+1}: mean_coef * known + std * z; after the last step (the data end,
            # also on DiscreteVP whose last grid time t = 0 is still noisy) known itself
            a, std = ctx.next_coefs()
            self._noising = (ctx, ctx.table(torch.stack([a, std], 1)))
        a, std = self._noising[1][n]
        if isinstance(std, Tensor) or std > 0:  # one fused pass, the wrapper's draw
            known = ctx.update(known, [], x_coef=a, noise=std, n=n, j=ctx.draws - 1)
        return self._from(self._to(x) * (1 - self.mask) + known * self.mask)


def _run(score_fn, sde, data: Tensor, mask: Tensor, basis, sampler: str, **kwargs) -> Tensor:
    if sampler in UNSUPPORTED:
        raise ValueError(f"sampler: {sampler!r} has no per-step state to condition; use a step-based sampler")
    return sample(
        score_fn,
        sde,
        tuple(data.shape),
        sampler=sampler,
        device=data.device,
        _project=_Replace(data, mask, basis),
        **kwargs,
    )


def inpaint(score_fn: Callable, sde, data: Tensor, mask: Tensor, *, sampler: str = "pc", **kwargs) -> Tensor:
    """Fill the unknown part of ``data`` [B, ...]: ``mask`` is 1 where data is known, 0 elsewhere
    (the unknown part of ``data`` may hold anything, NaN included: it is never read).

    Other keyword arguments go to ``sf.sample`` (steps, seed, sample_ids, progress, ...).
    """
    _checks.check_float_tensor("data", data)
    _checks.check_batched("data", data)
    if not isinstance(mask, Tensor) or mask.is_complex():
        raise TypeError("mask: expected a real tensor of 0/1 values")
    try:
        mask = torch.broadcast_to(mask.to(device=data.device, dtype=data.dtype), data.shape)
    except RuntimeError as err:
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not broadcast to data {tuple(data.shape)}") from err
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask: values must be 0 (unknown) or 1 (known)")
    known = mask == 1
    if not bool(torch.isfinite(data[known]).all()):
        raise ValueError("data: the known part (mask 1) contains NaN or inf")
    data = torch.where(known, data, torch.zeros((), dtype=data.dtype, device=data.device))  # unknown: any value
    return _run(score_fn, sde, data, mask, None, sampler, **kwargs)


def colorize(score_fn: Callable, sde, gray: Tensor, *, sampler: str = "pc", **kwargs) -> Tensor:
    """Colour images from grey levels: ``gray`` [B, 1, H, W] (or [B, 3, H, W] with equal channels).

    The grey level is channel 0 in score_sde's orthogonal decoupled colour basis; it is kept, the
    two other channels are sampled.  Returns [B, 3, H, W].
    """
    _checks.check_float_tensor("gray", gray)
    if gray.dim() != 4 or gray.shape[1] not in (1, 3):
        raise ValueError(f"gray: expected [B, 1, H, W] or [B, 3, H, W], got {tuple(gray.shape)}")
    if not bool(torch.isfinite(gray).all()):
        raise ValueError("gray: contains NaN or inf")
    data = gray.expand(-1, 3, -1, -1).contiguous() if gray.shape[1] == 1 else gray
    mask = torch.zeros_like(data)
    mask[:, 0] = 1
    return _run(score_fn, sde, data, mask, DECOUPLE, sampler, **kwargs)


def guided(
    score_fn: Callable,
    *,
    classifier_grad: Callable | None = None,
    classifier_scale: float = 1.0,
    cfg_scale: float | None = None,
    uncond_args: dict | None = None,
) -> Callable:
    """A guided score function for any sampler.

    Classifier guidance adds ``classifier_scale * classifier_grad(x, t, **extra_args)`` (the gradient
    of log p(y | x_t)).  Classifier-free guidance returns s_u + cfg_scale (s_c - s_u), where s_c is
    ``score_fn(x, t, **extra_args)`` and s_u the same with ``uncond_args`` overriding extra_args
    (e.g. ``{"label": null_label}``).
    """
    if not callable(score_fn):
        raise TypeError("score_fn: must be callable as score_fn(x, t, **extra_args)")
    if classifier_grad is None and cfg_scale is None:
        raise ValueError("classifier_grad, cfg_scale: give at least one")
    if classifier_grad is not None and not callable(classifier_grad):
        raise TypeError("classifier_grad: must be callable as classifier_grad(x, t, **extra_args)")
    classifier_scale = _checks.check_finite_scalar("classifier_scale", classifier_scale)
    if cfg_scale is not None:
        cfg_scale = _checks.check_finite_scalar("cfg_scale", cfg_scale)
        if uncond_args is None:
            raise ValueError("uncond_args: classifier-free guidance needs the unconditional arguments")
        if not isinstance(uncond_args, Mapping):
            raise TypeError(
                f"uncond_args: expected a dict of score_fn keyword arguments, got {type(uncond_args).__name__}"
            )

    def score(x: Tensor, t: Tensor, **extra_args) -> Tensor:
        s = score_fn(x, t, **extra_args)
        if cfg_scale is not None:
            s_u = score_fn(x, t, **{**extra_args, **uncond_args})
            s = s_u + cfg_scale * (s - s_u)
        if classifier_grad is not None:
            s = s + classifier_scale * classifier_grad(x, t, **extra_args)
        return s

    return score
