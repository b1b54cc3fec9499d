"""UniPC (Zhao et al. 2023), ``UniPCMultistepScheduler``: the UniP predictor and UniC corrector
(bh1 / bh2, any order), each one fused pass over (sample, stored outputs, current output).

The weights rho solve diffusers' small linear systems in float64.  Written without dividing by the
step h: diffusers' D1_k = (m_k - m0)/r_k with r_k = (lambda_k - lambda_s0)/h enters as
h/(lambda_k - lambda_s0) (m_k - m0), and at h = 0 the step returns the sample (diffusers: NaN
beyond first order).  ``solver_p`` (another scheduler as predictor) keeps its own step.
"""

from __future__ import annotations

import math

import numpy as np
from diffusers import UniPCMultistepScheduler as _UniPC
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ._common import alpha_sigma, at, div, lincomb, log_snr, merge_terms, need_steps, promote, x0_coefs_vp, x0_from


def _b_vector(hh: float, order: int, bh: str) -> tuple[float, np.ndarray]:
    """(B_h, b) of diffusers' recursion h_phi_k -> b_k = h_phi_k k! / B_h, in float64 (hh != 0)."""
    if bh == "bh1":
        B_h = hh
    elif bh == "bh2":
        B_h = math.expm1(hh)
    else:
        raise NotImplementedError()
    h_phi_k = math.expm1(hh) / hh - 1
    factorial_i, b = 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    return B_h, np.array(b)


class UniPCMultistepScheduler(_UniPC):
    """UniPC with diffusers' control flow (corrector first, then the predictor) and state."""

    def _alpha_sigma(self, i: int) -> tuple[float, float]:
        return alpha_sigma(at(self.sigmas, i), bool(self.config.use_flow_sigmas))

    def convert_model_output(self, model_output, *args, sample=None, **kwargs):
        if args or kwargs or sample is None:
            return super().convert_model_output(model_output, *args, sample=sample, **kwargs)
        raw = at(self.sigmas, self.step_index)
        alpha, sigma = self._alpha_sigma(self.step_index)
        kind = self.config.prediction_type
        dtype = promote(sample.dtype, model_output.dtype)
        if self.predict_x0:
            coefs = x0_coefs_vp(kind, alpha, sigma, raw)
            if coefs is None:
                raise ValueError(
                    f"prediction_type given as {kind} must be one of `epsilon`, `sample`, `v_prediction`, or"
                    " `flow_prediction` for the UniPCMultistepScheduler."
                )
            x0 = x0_from(sample, model_output, coefs, dtype)
            return self._threshold_sample(x0) if self.config.thresholding else x0
        if kind == "epsilon":
            return model_output
        if kind == "sample":
            return lincomb(sample, [(div(-alpha, sigma), model_output)], x_coef=div(1.0, sigma), dtype=dtype)
        if kind == "v_prediction":
            return lincomb(sample, [(alpha, model_output)], x_coef=sigma, dtype=dtype)
        raise ValueError(
            f"prediction_type given as {kind} must be one of `epsilon`, `sample`, or `v_prediction` for the"
            " UniPCMultistepScheduler."
        )

    def _bh_update(self, x, t: int, s0: int, history: list[tuple[int, object]], order: int, model_t=None):
        """X x + c0 m0 - A B_h (sum_k rho_k (m_k - m0)/r_k [+ rho_last (model_t - m0)]) from table
        positions t (target) and s0 (start); ``history`` = [(position of m_k, m_k)] for k = 1..order-1."""
        alpha_t, sigma_t = self._alpha_sigma(t)
        alpha_s0, sigma_s0 = self._alpha_sigma(s0)
        lam_s0 = log_snr(alpha_s0, sigma_s0)
        h = log_snr(alpha_t, sigma_t) - lam_s0
        hh = -h if self.predict_x0 else h
        X, A = (div(sigma_t, sigma_s0), alpha_t) if self.predict_x0 else (div(alpha_t, alpha_s0), sigma_t)
        m0 = self.model_outputs[-1]
        if (
            A == 0 and not self.predict_x0
        ):  # sigma_t expm1(h) -> alpha_t sigma_s0/alpha_s0 at sigma_t = 0 (diffusers: NaN)
            terms = [(-div(alpha_t * sigma_s0, alpha_s0), m0)]
        else:
            terms = [(-A * math.expm1(hh), m0)]
        corrector = model_t is not None
        if h != 0 and (corrector or order > 1):
            B_h, b = _b_vector(hh, order, self.config.solver_type)
            gaps = [log_snr(*self._alpha_sigma(p)) - lam_s0 for p, _ in history]  # = r_k h
            rks = np.array([g / h for g in gaps] + [1.0])
            R = np.stack([rks**i for i in range(order)])
            if corrector:
                rhos = [0.5] if order == 1 else list(np.linalg.solve(R, b))
            else:
                rhos = [0.5] if order == 2 else list(np.linalg.solve(R[:-1, :-1], b[:-1]))
            for (_, m), gap, rho in zip(history, gaps, rhos):
                g = -A * B_h * float(rho) * div(h, gap)
                terms += [(g, m), (-g, m0)]
            if corrector:
                g = -A * B_h * float(rhos[-1])
                terms += [(g, model_t), (-g, m0)]
        return lincomb(x, merge_terms(terms), x_coef=X, dtype=x.dtype)

    def multistep_uni_p_bh_update(self, model_output, *args, sample=None, order=None, **kwargs):
        if args or kwargs or sample is None or order is None:
            return super().multistep_uni_p_bh_update(model_output, *args, sample=sample, order=order, **kwargs)
        if self.solver_p:
            return self.solver_p.step(model_output, self.timestep_list[-1], sample).prev_sample
        i = self.step_index
        history = [(i - k, self.model_outputs[-(k + 1)]) for k in range(1, order)]
        return self._bh_update(sample, i + 1, i, history, order)

    def multistep_uni_c_bh_update(
        self, this_model_output, *args, last_sample=None, this_sample=None, order=None, **kwargs
    ):
        if args or kwargs or last_sample is None or this_sample is None or order is None:
            return super().multistep_uni_c_bh_update(
                this_model_output, *args, last_sample=last_sample, this_sample=this_sample, order=order, **kwargs
            )
        i = self.step_index
        history = [(i - (k + 1), self.model_outputs[-(k + 1)]) for k in range(1, order)]
        return self._bh_update(last_sample, i, i - 1, history, order, model_t=this_model_output)

    def step(self, model_output, timestep, sample, return_dict=True):
        need_steps(self)
        if self.step_index is None:
            self._init_step_index(timestep)
        use_corrector = (
            self.step_index > 0 and self.step_index - 1 not in self.disable_corrector and self.last_sample is not None
        )
        converted = self.convert_model_output(model_output, sample=sample)
        if use_corrector:
            sample = self.multistep_uni_c_bh_update(
                this_model_output=converted, last_sample=self.last_sample, this_sample=sample, order=self.this_order
            )
        for j in range(self.config.solver_order - 1):
            self.model_outputs[j] = self.model_outputs[j + 1]
            self.timestep_list[j] = self.timestep_list[j + 1]
        self.model_outputs[-1] = converted
        self.timestep_list[-1] = timestep
        if self.config.lower_order_final:
            this_order = min(self.config.solver_order, len(self.timesteps) - self.step_index)
        else:
            this_order = self.config.solver_order
        self.this_order = min(this_order, self.lower_order_nums + 1)
        assert self.this_order > 0
        self.last_sample = sample
        prev = self.multistep_uni_p_bh_update(model_output=model_output, sample=sample, order=self.this_order)
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)
