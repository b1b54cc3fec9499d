"""Turn a network of any common parameterisation into ``score_fn(x, t, **extra_args)``.

``t`` is [B] in the SDE's own time.  The network sees ``time_map(t)`` (default: the SDE's own map,
VPSDE / SubVPSDE t*999, VESDE sigma(t), DiscreteVP its table position tau, EDM sigma, RectifiedFlow t;
diffusers' FlowMatch networks take "t*1000") and may run in
bf16/fp16; its output is cast to fp32 and every conversion below runs in fp32 (float64 state stays
float64).  With a(t) = mean coefficient and s(t) = std of the perturbation kernel x_t = a x_0 + s n:

- ``from_eps``: score = -eps / s
- ``from_x0``: score = (a x0 - x) / s^2
- ``from_v`` (VP-type, a^2 + s^2 = 1): eps = s x + a v, score = -eps / s
- ``from_velocity`` (flow matching, v = n - x_0; on RectifiedFlow a = 1 - t, s = t): the score is
  affine in the output, score = A(t) x + B(t) v with A = -1 / (s (a + s)), B = -a / (s (a + s)),
  i.e. A = -1/t, B = -(1 - t)/t: score = -(x + (1 - t) v) / t
- ``from_denoiser`` (k-diffusion / EDM D(x, sigma) with its own preconditioning): sigma = s / a,
  score = (a D(x / a, sigma) - x) / s^2
- ``from_score``: the network's output is the score already (time map applied).

Each score function also exposes ``affine(x, t) -> (out, a [B], b [B])``, score = a x + b out with
out the network's own output (its dtype, not cast) and a, b float64: the samplers fold a and b into
their fused update's coefficients (``affine_coefs(t) -> (a, b)`` for the per-run tables, and
``net_time(t)`` for the network's time input), so a bf16/fp16 output is read once, by the fused
kernel.  ``from_denoiser`` folds on VE-type SDEs (a = 1); elsewhere its network input x / a(t) is a
pass of its own, and its score is formed by the adapter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import state_dtype
from .sde.base import SDE, as_time, bcast

PARAMETERISATIONS = ("score", "eps", "x0", "v", "velocity", "denoiser")
TIME_MAPS = ("default", "t", "t*999", "t*1000", "sigma", "c_noise")


def resolve_time_map(sde: SDE, time_map: str | Callable | None) -> Callable[[Tensor], Tensor]:
    """A named map (``TIME_MAPS``) or a callable t [B] -> [B]; None means the SDE's default."""
    if time_map is None or time_map == "default":
        return sde.time_map
    if callable(time_map):
        return time_map
    if time_map == "t":
        return lambda t: t
    if time_map == "t*999":
        return lambda t: t * 999
    if time_map == "t*1000":
        return lambda t: t * 1000
    if time_map == "sigma":
        return lambda t: sde.std(t) / sde.mean_coef(t)
    if time_map == "c_noise":
        return lambda t: torch.log(sde.std(t) / sde.mean_coef(t)) / 4
    raise ValueError(f"time_map: expected one of {', '.join(TIME_MAPS)} or a callable, got {time_map!r}")


def _check(net, sde) -> None:
    if not callable(net):
        raise TypeError(f"net: must be callable as net(x, t_net, **extra_args), got {type(net).__name__}")
    if not isinstance(sde, SDE):
        raise TypeError(f"sde: expected a scorefast.sde SDE, got {type(sde).__name__}")


def _wrap(net, sde, time_map, convert, coefs=None) -> Callable:
    """score_fn for ``net``; ``coefs(t) -> (a, b)`` (float64 [B]) when the score is a x + b out."""
    _check(net, sde)
    tmap = resolve_time_map(sde, time_map)

    def output(x: Tensor, t, **extra_args) -> Tensor:
        """The network's own output at (x, t [B] in the SDE's time), in the state dtype."""
        return net(x, tmap(as_time(t, x)).to(x.dtype), **extra_args).to(state_dtype(x))

    def score_fn(x: Tensor, t, **extra_args) -> Tensor:
        t = as_time(t, x)
        out = net(x, tmap(t).to(x.dtype), **extra_args)
        dt = state_dtype(x)
        return convert(out.to(dt), x.to(dt), t)

    score_fn.net, score_fn.sde, score_fn.output = net, sde, output
    if coefs is not None:

        def affine(x: Tensor, t, **extra_args) -> tuple[Tensor, Tensor, Tensor]:
            """(out, a, b): the network's output at (x, t [B] in the SDE's time), uncast, and the
            float64 [B] coefficients with score = a x + b out."""
            t = as_time(t, x)
            a, b = coefs(t)
            return net(x, tmap(t).to(x.dtype), **extra_args), a, b

        score_fn.affine, score_fn.affine_coefs, score_fn.net_time = affine, coefs, tmap
        score_fn.affine_of = score_fn  # a wrapper that copied these attributes (functools.wraps) is not it
    return score_fn


def from_score(net: Callable, sde: SDE, *, time_map=None) -> Callable:
    """score = net(x, time_map(t)) in fp32."""
    return _wrap(net, sde, time_map, lambda out, x, t: out, lambda t: (torch.zeros_like(t), torch.ones_like(t)))


def from_eps(net: Callable, sde: SDE, *, time_map=None) -> Callable:
    """score = -net(x, time_map(t)) / s(t) (DDPM's epsilon prediction)."""
    return _wrap(
        net,
        sde,
        time_map,
        lambda eps, x, t: -eps / bcast(sde.std(t), x),
        lambda t: (torch.zeros_like(t), -1 / sde.std(t)),
    )


def from_x0(net: Callable, sde: SDE, *, time_map=None) -> Callable:
    """score = (a(t) x0 - x) / s(t)^2 with x0 = net(x, time_map(t))."""

    def convert(x0, x, t):
        return (bcast(sde.mean_coef(t), x) * x0 - x) / bcast(sde.std(t) ** 2, x)

    def coefs(t):
        var = sde.std(t) ** 2
        return -1 / var, sde.mean_coef(t) / var

    return _wrap(net, sde, time_map, convert, coefs)


def from_v(net: Callable, sde: SDE, *, time_map=None) -> Callable:
    """v-prediction (Salimans & Ho 2022) on a VP-type SDE: eps = s x + a v, score = -eps / s."""
    probe = torch.tensor([0.5 * (sde.T + sde.eps)], dtype=torch.float64)
    if abs(float(sde.mean_coef(probe) ** 2 + sde.std(probe) ** 2) - 1) > 1e-6:
        raise ValueError(f"sde: v-prediction needs a variance-preserving SDE (a^2 + s^2 = 1), got {sde!r}")

    def convert(v, x, t):
        a, s = bcast(sde.mean_coef(t), x), bcast(sde.std(t), x)
        return -(s * x + a * v) / s

    return _wrap(net, sde, time_map, convert, lambda t: (-torch.ones_like(t), -sde.mean_coef(t) / sde.std(t)))


def velocity_coefs(sde: SDE, t: Tensor) -> tuple[Tensor, Tensor]:
    """(A, B), float64 [B], with score = A x + B v for the velocity v = n - x_0 of x_t = a x_0 + s n:
    E[n | x] = (x + a v) / (a + s), score = -E[n | x] / s.  RectifiedFlow: A = -1/t, B = -(1 - t)/t."""
    a, s = sde.mean_coef(t), sde.std(t)
    scale = -1 / (s * (a + s))
    return scale, scale * a


def from_velocity(net: Callable, sde: SDE, *, time_map=None) -> Callable:
    """Flow matching's velocity v = n - x_0 (SD3, Flux; the ODE dx/dt = v on RectifiedFlow):
    score = A(t) x + B(t) v = -(x + (1 - t) v) / t on RectifiedFlow (``velocity_coefs``).

    ``score_fn.output(x, t)`` is the velocity itself (what ``fm_loss`` trains).  The default time map
    is the SDE's (t on RectifiedFlow); diffusers' FlowMatch networks take ``time_map="t*1000"``.
    """

    def convert(v, x, t):
        A, B = velocity_coefs(sde, t)
        return bcast(A, x) * x + bcast(B, x) * v

    return _wrap(net, sde, time_map, convert, lambda t: velocity_coefs(sde, t))


def from_denoiser(denoiser: Callable, sde: SDE) -> Callable:
    """A k-diffusion / EDM denoiser D(x, sigma) (preconditioning inside D): score = (a D(x/a, s/a) - x) / s^2."""
    _check(denoiser, sde)

    def score_fn(x: Tensor, t, **extra_args) -> Tensor:
        t = as_time(t, x)
        dt = state_dtype(x)
        a, s = sde.mean_coef(t), sde.std(t)
        xs = (x.to(dt) / bcast(a, x.to(dt))).to(x.dtype)
        d = denoiser(xs, (s / a).to(x.dtype), **extra_args).to(dt)
        return (bcast(a, d) * d - x.to(dt)) / bcast(s**2, d)

    def affine(x: Tensor, t, **extra_args) -> tuple[Tensor, Tensor, Tensor]:
        """(D(x / a, s / a) uncast, -1 / s^2, a / s^2): score = a' x + b' D (float64 [B] coefficients)."""
        t = as_time(t, x)
        dt = state_dtype(x)
        a, s = sde.mean_coef(t), sde.std(t)
        xs = (x.to(dt) / bcast(a, x.to(dt))).to(x.dtype)
        return denoiser(xs, (s / a).to(x.dtype), **extra_args), -1 / s**2, a / s**2

    score_fn.net, score_fn.sde, score_fn.affine = denoiser, sde, affine
    if _unit_mean(sde):  # VE-type (a = 1): the input x / a is x itself, so the samplers may fold it

        def coefs(t):
            var = sde.std(t) ** 2
            return -1 / var, 1 / var

        score_fn.affine_coefs, score_fn.net_time = coefs, lambda t: sde.std(t) / sde.mean_coef(t)
        score_fn.affine_of = score_fn
    return score_fn


def _unit_mean(sde: SDE) -> bool:
    """The SDE's mean coefficient is VESDE's / EDM's own a(t) = 1 (not an override)."""
    from .sde import EDM, VESDE

    return type(sde).mean_coef in (VESDE.mean_coef, EDM.mean_coef)


def from_parameterisation(net: Callable, sde: SDE, parameterisation: str, *, time_map=None) -> Callable:
    """Dispatch on a parameterisation name (``PARAMETERISATIONS``), as checkpoints record it."""
    if parameterisation == "denoiser":
        return from_denoiser(net, sde)
    makers = {"score": from_score, "eps": from_eps, "x0": from_x0, "v": from_v, "velocity": from_velocity}
    if parameterisation not in makers:
        raise ValueError(f"parameterisation: expected one of {', '.join(PARAMETERISATIONS)}, got {parameterisation!r}")
    return makers[parameterisation](net, sde, time_map=time_map)


def from_diffusers(unet: Callable, scheduler, *, time_map=None) -> tuple[Callable, SDE]:
    """(score_fn, sde) for a diffusers UNet and the scheduler it was trained with.

    The SDE is ``DiscreteVP(scheduler.alphas_cumprod)``; the network sees the table position tau
    (diffusers' timestep) unless ``time_map`` says otherwise, and ``scheduler.config.prediction_type``
    ("epsilon", "v_prediction" or "sample") picks the conversion.  ``unet(x, tau).sample`` (or a
    plain tensor) is the network's output.
    """
    from .sde import DiscreteVP

    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        raise TypeError(
            f"scheduler: expected a diffusers scheduler with alphas_cumprod, got {type(scheduler).__name__}"
        )
    sde = DiscreteVP(abar)
    kind = scheduler.config.prediction_type
    names = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
    if kind not in names:
        raise ValueError(f"scheduler: prediction_type {kind!r} is not one of {', '.join(names)}")

    def net(x: Tensor, tau: Tensor, **extra_args) -> Tensor:
        out = unet(x, tau, **extra_args)
        return out.sample if hasattr(out, "sample") else out

    return from_parameterisation(net, sde, names[kind], time_map=time_map), sde
