"""DPM-Solver (Lu et al. 2022) multistep and singlestep: ``DPMSolverMultistepScheduler`` and
``DPMSolverSinglestepScheduler``, every algorithm type (dpmsolver++, sde-dpmsolver++, dpmsolver,
sde-dpmsolver), solver type (midpoint, heun) and order (1-3).

Every update is ``X x + sum_j c_j m_j + s z`` in the stored model outputs m_j: one fused pass.  The
coefficients are diffusers' with the divided differences folded in, written so that no step length
h divides anything: diffusers' D1 = (m0 - m1)/r0 with r0 = h0/h is (m0 - m1) h/h0, and its phi
factors ((e^-h - 1)/h + 1) D1 become (expm1(-h) + h)/h0 (m0 - m1).  So equal consecutive sigmas
(h = 0, e.g. karras or lu sigmas with ``final_sigmas_type="sigma_min"``) return the sample, the
limit of the update, where diffusers' midpoint update returns the sample and its heun and
third-order updates return NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from diffusers import DPMSolverMultistepScheduler as _DPM
from diffusers import DPMSolverSinglestepScheduler as _DPMSingle
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ._common import (
    StepNoise,
    alpha_sigma,
    at,
    div,
    eps_coefs_vp,
    lincomb,
    log_snr,
    merge_terms,
    multistep_done,
    multistep_order,
    need_steps,
    promote,
    x0_coefs_vp,
    x0_from,
)

_DATA = ("dpmsolver++", "sde-dpmsolver++")  # algorithms on the data prediction x0; the others on eps


@dataclass
class Coefs:
    """One step from s to t: X x + c0 m0 (+ noise z), and the higher-order factors times h^k.

    P = (coefficient of diffusers' D1) * h for the heun / third-order forms, M the same for the
    second-order midpoint form, Q = (coefficient of D2) * h^2.  All finite at h = 0 (they vanish).
    """

    X: float
    c0: float
    P: float
    M: float
    Q: float | None
    noise: float = 0.0


def dpm_coefs(algorithm: str, alpha_t: float, sigma_t: float, alpha_s: float, sigma_s: float, h: float) -> Coefs:
    """diffusers' DPM-Solver coefficients for h = lambda_t - lambda_s (float64)."""
    if algorithm == "dpmsolver++":
        e = math.expm1(-h)
        return Coefs(
            div(sigma_t, sigma_s),
            -alpha_t * e,
            alpha_t * (e + h),
            -0.5 * alpha_t * e * h,
            -alpha_t * (e + h - h * h / 2),
        )
    if algorithm == "sde-dpmsolver++":
        e = math.expm1(-2 * h)
        X = div(sigma_t, sigma_s) * math.exp(-h)
        noise = sigma_t * math.sqrt(-e) if e <= 0 else math.nan
        P, Q = alpha_t * (e + 2 * h) / 2, -alpha_t * (e + 2 * h + 2 * h * h) / 4
        return Coefs(X, -alpha_t * e, P, -0.5 * alpha_t * e * h, Q, noise)
    e = math.expm1(h)
    if algorithm == "dpmsolver":
        return Coefs(
            div(alpha_t, alpha_s),
            -sigma_t * e,
            -sigma_t * (e - h),
            -0.5 * sigma_t * e * h,
            -sigma_t * (e - h - h * h / 2),
        )
    if algorithm == "sde-dpmsolver":
        noise = sigma_t * math.sqrt(math.expm1(2 * h)) if h >= 0 else math.nan
        return Coefs(div(alpha_t, alpha_s), -2 * sigma_t * e, -2 * sigma_t * (e - h), -sigma_t * e * h, None, noise)
    raise ValueError(f"algorithm_type {algorithm} is not one of dpmsolver++, sde-dpmsolver++, dpmsolver, sde-dpmsolver")


class _Tables:
    """alpha, sigma, lambda at sigma-table positions, as floats (diffusers' _sigma_to_alpha_sigma_t)."""

    def __init__(self, scheduler, positions):
        flow = bool(getattr(scheduler.config, "use_flow_sigmas", False))
        pairs = [alpha_sigma(at(scheduler.sigmas, i), flow) for i in positions]
        self.alpha = [a for a, _ in pairs]
        self.sigma = [s for _, s in pairs]
        self.lam = [log_snr(a, s) for a, s in pairs]


def convert(scheduler, model_output, sample, name: str):
    """``convert_model_output``: x0 (data-prediction algorithms) or eps, thresholded as diffusers."""
    cfg = scheduler.config
    kind = cfg.prediction_type
    if kind == "epsilon" and cfg.variance_type in ["learned", "learned_range"]:
        model_output = model_output[:, :3]
    raw_sigma = at(scheduler.sigmas, scheduler.step_index)
    alpha, sigma = alpha_sigma(raw_sigma, bool(getattr(cfg, "use_flow_sigmas", False)))
    dtype = promote(sample.dtype, model_output.dtype)
    if cfg.algorithm_type in _DATA:
        coefs = x0_coefs_vp(kind, alpha, sigma, raw_sigma)
        if coefs is None:
            raise ValueError(
                f"prediction_type given as {kind} must be one of `epsilon`, `sample`, `v_prediction`, or"
                f" `flow_prediction` for the {name}."
            )
        x0 = x0_from(sample, model_output, coefs, dtype)
        return scheduler._threshold_sample(x0) if cfg.thresholding else x0
    coefs = eps_coefs_vp(kind, alpha, sigma)
    if coefs is None:
        raise ValueError(
            f"prediction_type given as {kind} must be one of `epsilon`, `sample`, or `v_prediction` for the {name}."
        )
    eps = (
        model_output
        if coefs == (0.0, 1.0)
        else lincomb(sample, [(coefs[1], model_output)], x_coef=coefs[0], dtype=dtype)
    )
    if cfg.thresholding:
        x0 = scheduler._threshold_sample(lincomb(sample, [(div(-sigma, alpha), eps)], x_coef=div(1.0, alpha)))
        eps = lincomb(sample, [(div(-alpha, sigma), x0)], x_coef=div(1.0, sigma))
    return eps


def _noise_arg(coefs: Coefs, noise: StepNoise | None):
    if noise is None:
        return None
    return (coefs.noise, noise)


def multistep_update(scheduler, order: int, sample, noise: StepNoise | None, dtype):
    """The multistep update of ``order`` from sigma[i] to sigma[i + 1] with the last ``order`` outputs."""
    i = scheduler.step_index
    ms = scheduler.model_outputs
    tab = _Tables(scheduler, [i + 1, i, i - 1, i - 2][: order + 1])
    h = tab.lam[0] - tab.lam[1]
    c = dpm_coefs(scheduler.config.algorithm_type, tab.alpha[0], tab.sigma[0], tab.alpha[1], tab.sigma[1], h)
    m0 = ms[-1]
    terms = [(c.c0, m0)]
    if order == 2:  # K (m0 - m1)/h0
        k = div(c.M if scheduler.config.solver_type == "midpoint" else c.P, tab.lam[1] - tab.lam[2])
        terms += [(k, m0), (-k, ms[-2])]
    elif order == 3:  # P [u + h0/(h0+h1) (u - w)] + Q/(h0+h1) (u - w), u = (m0-m1)/h0, w = (m1-m2)/h1
        if c.Q is None:
            raise ValueError("solver_order=3 is not available for algorithm_type sde-dpmsolver (nor in diffusers)")
        h0, h1 = tab.lam[1] - tab.lam[2], tab.lam[2] - tab.lam[3]
        s = h0 + h1
        cu = c.P * (1 + div(h0, s)) + div(c.Q, s)
        cw = -c.P * div(h0, s) - div(c.Q, s)
        terms += [(div(cu, h0), m0), (div(-cu, h0) + div(cw, h1), ms[-2]), (div(-cw, h1), ms[-3])]
    return lincomb(sample, merge_terms(terms), x_coef=c.X, noise=_noise_arg(c, noise), dtype=dtype)


def singlestep_update(scheduler, order: int, sample, noise: StepNoise | None, dtype):
    """The singlestep update of ``order`` from sigma[i - order + 1] to sigma[i + 1] (stored ``sample``)."""
    i = scheduler.step_index
    ms = scheduler.model_outputs
    tab = _Tables(scheduler, [i + 1, i, i - 1, i - 2][: order + 1])
    first = order  # the table position the step starts from (s_{order-1})
    h = tab.lam[0] - tab.lam[first]
    c = dpm_coefs(scheduler.config.algorithm_type, tab.alpha[0], tab.sigma[0], tab.alpha[first], tab.sigma[first], h)
    midpoint = scheduler.config.solver_type == "midpoint"
    if order == 1:
        terms = [(c.c0, ms[-1])]
    elif order == 2:  # c0 m1 + K (m0 - m1)/h0, h0 = lambda_s0 - lambda_s1
        k = div(c.M if midpoint else c.P, tab.lam[1] - tab.lam[2])
        terms = [(c.c0 - k, ms[-2]), (k, ms[-1])]
    else:  # c0 m2 + ca a + cb b with a = (m1 - m2)/h1, b = (m0 - m2)/h0
        h0, h1 = tab.lam[1] - tab.lam[3], tab.lam[2] - tab.lam[3]
        if midpoint:
            ca, cb = 0.0, c.P
        else:
            ca, cb = div(c.P * h0 - 2 * c.Q, h0 - h1), div(2 * c.Q - c.P * h1, h0 - h1)
        terms = [(div(cb, h0), ms[-1]), (div(ca, h1), ms[-2]), (c.c0 - div(ca, h1) - div(cb, h0), ms[-3])]
    return lincomb(sample, terms, x_coef=c.X, noise=_noise_arg(c, noise), dtype=dtype)


def _as_noise(noise) -> StepNoise | None:
    """A noise tensor passed to a public update method, as the StepNoise the updates take."""
    return None if noise is None else StepNoise(noise, variance_noise=noise)


class DPMSolverMultistepScheduler(_DPM):
    """Multistep DPM-Solver / DPM-Solver++ and their SDE forms; noise from the Philox stream."""

    def convert_model_output(self, model_output, *args, sample=None, **kwargs):
        if args or kwargs or sample is None:  # diffusers' deprecated positional form
            return super().convert_model_output(model_output, *args, sample=sample, **kwargs)
        return convert(self, model_output, sample, "DPMSolverMultistepScheduler")

    def dpm_solver_first_order_update(self, model_output, *args, sample=None, noise=None, **kwargs):
        if args or kwargs or sample is None:
            return super().dpm_solver_first_order_update(model_output, *args, sample=sample, noise=noise, **kwargs)
        return self._with_outputs([model_output], 1, sample, noise)

    def multistep_dpm_solver_second_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        if args or kwargs or sample is None:
            return super().multistep_dpm_solver_second_order_update(
                model_output_list, *args, sample=sample, noise=noise, **kwargs
            )
        return self._with_outputs(model_output_list, 2, sample, noise)

    def multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        if args or kwargs or sample is None:
            return super().multistep_dpm_solver_third_order_update(
                model_output_list, *args, sample=sample, noise=noise, **kwargs
            )
        return self._with_outputs(model_output_list, 3, sample, noise)

    def _with_outputs(self, outputs, order, sample, noise):
        saved, self.model_outputs = self.model_outputs, list(outputs)
        try:
            return multistep_update(self, order, sample, _as_noise(noise), None)
        finally:
            self.model_outputs = saved

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True):
        need_steps(self)
        if self.step_index is None:
            self._init_step_index(timestep)
        n, i, cfg = len(self.timesteps), self.step_index, self.config
        lower_order_final = (i == n - 1) and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
        )
        lower_order_second = (i == n - 2) and cfg.lower_order_final and n < 15
        model_output = self.convert_model_output(model_output, sample=sample)
        order = multistep_order(self, model_output, lower_order_final, lower_order_second)
        noise = None
        if cfg.algorithm_type in ("sde-dpmsolver", "sde-dpmsolver++"):
            noise = StepNoise(model_output, generator, variance_noise)
        prev = multistep_update(self, order, sample, noise, model_output.dtype)
        multistep_done(self)
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)


class DPMSolverSinglestepScheduler(_DPMSingle):
    """Singlestep DPM-Solver / DPM-Solver++ (orders from ``order_list``); SDE noise from the Philox stream."""

    def convert_model_output(self, model_output, *args, sample=None, **kwargs):
        if args or kwargs or sample is None:
            return super().convert_model_output(model_output, *args, sample=sample, **kwargs)
        return convert(self, model_output, sample, "DPMSolverSinglestepScheduler")

    def dpm_solver_first_order_update(self, model_output, *args, sample=None, noise=None, **kwargs):
        if args or kwargs or sample is None:
            return super().dpm_solver_first_order_update(model_output, *args, sample=sample, noise=noise, **kwargs)
        return self._with_outputs([model_output], 1, sample, noise)

    def singlestep_dpm_solver_second_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        if args or kwargs or sample is None:
            return super().singlestep_dpm_solver_second_order_update(
                model_output_list, *args, sample=sample, noise=noise, **kwargs
            )
        return self._with_outputs(model_output_list, 2, sample, noise)

    def singlestep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        if args or kwargs or sample is None:
            return super().singlestep_dpm_solver_third_order_update(
                model_output_list, *args, sample=sample, noise=noise, **kwargs
            )
        return self._with_outputs(model_output_list, 3, sample, noise)

    def _with_outputs(self, outputs, order, sample, noise):
        saved, self.model_outputs = self.model_outputs, list(outputs)
        try:
            dtype = promote(sample.dtype, *(m.dtype for m in outputs[-order:]))
            return singlestep_update(self, order, sample, _as_noise(noise), dtype)
        finally:
            self.model_outputs = saved

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        need_steps(self)
        if self.step_index is None:
            self._init_step_index(timestep)
        model_output = self.convert_model_output(model_output, sample=sample)
        for j in range(self.config.solver_order - 1):
            self.model_outputs[j] = self.model_outputs[j + 1]
        self.model_outputs[-1] = model_output
        noise = StepNoise(model_output, generator) if self.config.algorithm_type == "sde-dpmsolver++" else None
        order = self.order_list[self.step_index]
        while self.model_outputs[-order] is None:
            order -= 1
        if order == 1:
            self.sample = sample
        used = self.model_outputs[-order:]
        dtype = promote(self.sample.dtype, *(m.dtype for m in used))
        prev = singlestep_update(self, order, self.sample, noise, dtype)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)
