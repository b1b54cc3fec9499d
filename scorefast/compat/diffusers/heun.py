"""Two-stage steps in sigma: HeunDiscrete, KDPM2Discrete and KDPM2AncestralDiscrete.

diffusers runs each as two ``step`` calls per interval (its tables repeat every sigma): the first
stores the sample (and, for Heun, the first derivative), the second combines.  Both stages are one
fused pass from (stored sample, current sample, model output[, first derivative], noise), plus the
returned x0.  The state attributes (``sample``, ``prev_derivative``, ``dt``) are diffusers' own.
"""

from __future__ import annotations

from diffusers import HeunDiscreteScheduler as _Heun
from diffusers import KDPM2AncestralDiscreteScheduler as _KDPM2A
from diffusers import KDPM2DiscreteScheduler as _KDPM2
from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete import KDPM2AncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_k_dpm_2_discrete import KDPM2DiscreteSchedulerOutput

from ._common import StepNoise, at, div, lincomb, promote, x0_from
from .euler import x0_coefs_or_raise


def derivative_terms(sample, model_output, coefs, x0, sigma: float, scale: float):
    """scale * (sample - x0) / sigma as (x_coef, terms): from (sample, m) when x0 = p x + q m, else from x0."""
    c = div(scale, sigma)
    if coefs is None:
        return c, [(-c, x0)]
    p, q = coefs
    return c * (1 - p), [(-c * q, model_output)]


def _x0(scheduler, sample, model_output, sigma: float, sample_ok: bool):
    """(x0 coefficients or None when clipped, x0) for the scheduler's prediction type at ``sigma``."""
    coefs = x0_coefs_or_raise(scheduler.config.prediction_type, sigma, sample_ok)
    x0 = x0_from(sample, model_output, coefs, promote(sample.dtype, model_output.dtype))
    if getattr(scheduler.config, "clip_sample", False):
        r = scheduler.config.clip_sample_range
        return None, x0.clamp(-r, r)
    return coefs, x0


class HeunDiscreteScheduler(_Heun):
    """Heun's method (Karras et al. 2022, Algorithm 1 without churn)."""

    def step(self, model_output, timestep, sample, return_dict=True):
        if self.step_index is None:
            self._init_step_index(timestep)
        first = self.state_in_first_order
        i = self.step_index
        sigma, sigma_next = (
            (at(self.sigmas, i), at(self.sigmas, i + 1)) if first else (at(self.sigmas, i - 1), at(self.sigmas, i))
        )
        coefs, x0 = _x0(self, sample, model_output, sigma if first else sigma_next, True)
        dtype = promote(sample.dtype, x0.dtype)
        if first:
            dt = sigma_next - sigma
            x_coef, terms = derivative_terms(sample, model_output, coefs, x0, sigma, 1.0)
            derivative = lincomb(sample, terms, x_coef=x_coef, dtype=dtype)
            x_coef, terms = derivative_terms(sample, model_output, coefs, x0, sigma, dt)  # from (x, m), not d1
            prev = lincomb(sample, terms, x_coef=1 + x_coef, dtype=dtype)
            self.prev_derivative, self.dt, self.sample = derivative, self.sigmas[i + 1] - self.sigmas[i], sample
        else:  # x1 + dt/2 (d1 + (x - x0)/sigma_next)
            dt = sigma_next - sigma  # diffusers' stored self.dt, in float64
            x_coef, terms = derivative_terms(sample, model_output, coefs, x0, sigma_next, dt / 2)
            base, d1 = self.sample, self.prev_derivative
            prev = lincomb(base, [(x_coef, sample), (dt / 2, d1), *terms], dtype=promote(dtype, base.dtype, d1.dtype))
            self.prev_derivative = self.dt = self.sample = None
        self._step_index += 1
        if not return_dict:
            return (prev, x0)
        return HeunDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class KDPM2DiscreteScheduler(_KDPM2):
    """DPM-Solver-2 in sigma (k-diffusion's sample_dpm_2): Euler to the log-midpoint, then the full step."""

    def step(self, model_output, timestep, sample, return_dict=True):
        if self.step_index is None:
            self._init_step_index(timestep)
        first = self.state_in_first_order
        i = self.step_index
        if first:
            sigma, sigma_mid, sigma_next = (at(self.sigmas, i), at(self.sigmas_interpol, i + 1), at(self.sigmas, i + 1))
        else:
            sigma, sigma_mid, sigma_next = (at(self.sigmas, i - 1), at(self.sigmas_interpol, i), at(self.sigmas, i))
        coefs, x0 = _x0(self, sample, model_output, sigma if first else sigma_mid, False)
        dtype = promote(sample.dtype, x0.dtype)
        if first:  # sample + (sample - x0)/sigma * (sigma_mid - sigma)
            x_coef, terms = derivative_terms(sample, model_output, coefs, x0, sigma, sigma_mid - sigma)
            prev = lincomb(sample, terms, x_coef=1 + x_coef, dtype=dtype)
            self.sample = sample
        else:  # x1 + (x - x0)/sigma_mid * (sigma_next - sigma)
            x_coef, terms = derivative_terms(sample, model_output, coefs, x0, sigma_mid, sigma_next - sigma)
            base = self.sample
            prev = lincomb(base, [(x_coef, sample), *terms], dtype=promote(dtype, base.dtype))
            self.sample = None
        self._step_index += 1
        if not return_dict:
            return (prev, x0)
        return KDPM2DiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class KDPM2AncestralDiscreteScheduler(_KDPM2A):
    """Ancestral DPM-Solver-2: the second stage steps to sigma_down and adds sigma_up of fresh noise."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if self.step_index is None:
            self._init_step_index(timestep)
        first = self.state_in_first_order
        i = self.step_index if first else self.step_index - 1
        sigma, sigma_mid, sigma_up = at(self.sigmas, i), at(self.sigmas_interpol, i), at(self.sigmas_up, i)
        sigma_down = at(self.sigmas_down, self.step_index - 1)
        coefs, x0 = _x0(self, sample, model_output, sigma if first else sigma_mid, False)
        dtype = promote(sample.dtype, x0.dtype)
        if first:
            x_coef, terms = derivative_terms(sample, model_output, coefs, x0, sigma, sigma_mid - sigma)
            prev = lincomb(sample, terms, x_coef=1 + x_coef, dtype=dtype)
            self.sample, self.dt = sample, self.sigmas_interpol[i] - self.sigmas[i]
        else:
            x_coef, terms = derivative_terms(sample, model_output, coefs, x0, sigma_mid, sigma_down - sigma)
            base = self.sample
            noise = (sigma_up, StepNoise(model_output, generator))
            dtype = promote(dtype, base.dtype, model_output.dtype)
            prev = lincomb(base, [(x_coef, sample), *terms], noise=noise, dtype=dtype)
            self.sample = None
        self._step_index += 1
        if not return_dict:
            return (prev, x0)
        return KDPM2AncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
