"""DEIS (Zhang & Chen 2022), ``DEISMultistepScheduler`` (log-rho multistep, orders 1-3): each update
x_t = alpha_t (x/alpha_s0 + sum_j c_j eps_j) is one fused pass; the c_j are diffusers' closed forms
in float64."""

from __future__ import annotations

import math

from diffusers import DEISMultistepScheduler as _DEIS
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ._common import (
    alpha_sigma,
    at,
    div,
    lincomb,
    log_snr,
    multistep_done,
    multistep_order,
    need_steps,
    promote,
    x0_coefs_vp,
    x0_from,
)


def _log(v: float) -> float:
    return -math.inf if v == 0 else math.log(v)


def _ind2(t: float, b: float, c: float) -> float:
    return div(t * (-_log(c) + _log(t) - 1), _log(b) - _log(c))


def _ind3(t: float, b: float, c: float, d: float) -> float:
    lt, lb, lc, ld = _log(t), _log(b), _log(c), _log(d)
    numerator = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
    return div(numerator, (lb - lc) * (lb - ld))


class DEISMultistepScheduler(_DEIS):
    """DEIS on the noise prediction: convert_model_output gives eps (from x0, thresholded if asked)."""

    def _tables(self, positions):
        flow = bool(self.config.use_flow_sigmas)
        return [alpha_sigma(at(self.sigmas, i), flow) for i in positions]

    def convert_model_output(self, model_output, *args, sample=None, **kwargs):
        if args or kwargs or sample is None:
            return super().convert_model_output(model_output, *args, sample=sample, **kwargs)
        raw = at(self.sigmas, self.step_index)
        ((alpha, sigma),) = self._tables([self.step_index])
        kind = self.config.prediction_type
        coefs = x0_coefs_vp(kind, alpha, sigma, raw)
        if coefs is None:
            raise ValueError(
                f"prediction_type given as {kind} must be one of `epsilon`, `sample`, `v_prediction`, or"
                " `flow_prediction` for the DEISMultistepScheduler."
            )
        if self.config.algorithm_type != "deis":
            raise NotImplementedError("only support log-rho multistep deis now")
        dtype = promote(sample.dtype, model_output.dtype)
        if self.config.thresholding:  # eps = (x - alpha x0)/sigma from the thresholded x0
            x0 = self._threshold_sample(x0_from(sample, model_output, coefs, dtype))
            return lincomb(sample, [(div(-alpha, sigma), x0)], x_coef=div(1.0, sigma), dtype=promote(dtype, x0.dtype))
        p, q = coefs
        return lincomb(sample, [(div(-alpha * q, sigma), model_output)], x_coef=div(1 - alpha * p, sigma), dtype=dtype)

    def _update(self, order: int, sample, outputs):
        i = self.step_index
        tab = self._tables([i + 1, i, i - 1, i - 2][: order + 1])
        (alpha_t, sigma_t), (alpha_s0, sigma_s0) = tab[0], tab[1]
        if self.config.algorithm_type != "deis":
            raise NotImplementedError("only support log-rho multistep deis now")
        dtype = promote(sample.dtype, *(m.dtype for m in outputs[-order:]))
        if order == 1:
            h = log_snr(alpha_t, sigma_t) - log_snr(alpha_s0, sigma_s0)
            return lincomb(
                sample, [(-sigma_t * math.expm1(h), outputs[-1])], x_coef=div(alpha_t, alpha_s0), dtype=dtype
            )
        rho = [div(s, a) for a, s in tab]
        if order == 2:
            rt, r0, r1 = rho
            coefs = [_ind2(rt, r0, r1) - _ind2(r0, r0, r1), _ind2(rt, r1, r0) - _ind2(r0, r1, r0)]
        else:
            rt, r0, r1, r2 = rho
            coefs = [
                _ind3(rt, r0, r1, r2) - _ind3(r0, r0, r1, r2),
                _ind3(rt, r1, r2, r0) - _ind3(r0, r1, r2, r0),
                _ind3(rt, r2, r0, r1) - _ind3(r0, r2, r0, r1),
            ]
        terms = [(alpha_t * c, outputs[-1 - j]) for j, c in enumerate(coefs)]
        return lincomb(sample, terms, x_coef=div(alpha_t, alpha_s0), dtype=dtype)

    def deis_first_order_update(self, model_output, *args, sample=None, **kwargs):
        if args or kwargs or sample is None:
            return super().deis_first_order_update(model_output, *args, sample=sample, **kwargs)
        return self._update(1, sample, [model_output])

    def multistep_deis_second_order_update(self, model_output_list, *args, sample=None, **kwargs):
        if args or kwargs or sample is None:
            return super().multistep_deis_second_order_update(model_output_list, *args, sample=sample, **kwargs)
        return self._update(2, sample, model_output_list)

    def multistep_deis_third_order_update(self, model_output_list, *args, sample=None, **kwargs):
        if args or kwargs or sample is None:
            return super().multistep_deis_third_order_update(model_output_list, *args, sample=sample, **kwargs)
        return self._update(3, sample, model_output_list)

    def step(self, model_output, timestep, sample, return_dict=True):
        need_steps(self)
        if self.step_index is None:
            self._init_step_index(timestep)
        n, i, cfg = len(self.timesteps), self.step_index, self.config
        lower_order_final = (i == n - 1) and cfg.lower_order_final and n < 15
        lower_order_second = (i == n - 2) and cfg.lower_order_final and n < 15
        model_output = self.convert_model_output(model_output, sample=sample)
        order = multistep_order(self, model_output, lower_order_final, lower_order_second)
        prev = self._update(order, sample, self.model_outputs)
        multistep_done(self)
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)
