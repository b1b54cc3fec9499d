"""Euler steps in sigma (x = x0 + sigma eps): EulerDiscrete, EulerAncestralDiscrete and EDMEuler.

prev = x + (x - x0)/sigma_hat * dt (+ sigma_up z) is affine in (sample, model output), so it is one
fused pass from them; x0 (``pred_original_sample``) is a second pass because it is returned.  Churn
(s_churn > 0) first adds its noise to the sample, one more pass, as diffusers does.
"""

from __future__ import annotations

import math

import torch
from diffusers import EDMEulerScheduler as _EDMEuler
from diffusers import EulerAncestralDiscreteScheduler as _EulerAncestral
from diffusers import EulerDiscreteScheduler as _Euler
from diffusers.schedulers import scheduling_edm_euler, scheduling_euler_ancestral_discrete, scheduling_euler_discrete
from diffusers.schedulers.scheduling_edm_euler import EDMEulerSchedulerOutput
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

from ._common import StepNoise, at, div, lincomb, promote, sqrt, x0_coefs_ve, x0_from


def check_timestep(scheduler, timestep, logger=None) -> None:
    """diffusers' refusal of integer indices as timesteps, its scale_model_input warning, the step index."""
    if isinstance(timestep, int | torch.IntTensor | torch.LongTensor):
        name = type(scheduler).__name__
        raise ValueError(
            f"Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to `{name}.step()` is not"
            " supported. Make sure to pass one of the `scheduler.timesteps` as a timestep."
        )
    if logger is not None and not scheduler.is_scale_input_called:
        logger.warning(
            "The `scale_model_input` function should be called before `step` to ensure correct denoising. "
            "See `StableDiffusionPipeline` for a usage example."
        )
    if scheduler.step_index is None:
        scheduler._init_step_index(timestep)


def x0_coefs_or_raise(kind: str, sigma: float, sample_ok: bool = True) -> tuple[float, float]:
    """x0_coefs_ve with diffusers' errors: NotImplementedError for ``sample`` where it has none, else ValueError."""
    if kind == "sample" and not sample_ok:
        raise NotImplementedError("prediction_type not implemented yet: sample")
    coefs = x0_coefs_ve(kind, sigma)
    if coefs is None or kind == "original_sample":
        raise ValueError(f"prediction_type given as {kind} must be one of `epsilon`, or `v_prediction`")
    return coefs


def churn(sample, model_output, sigma: float, s_churn, s_tmin, s_tmax, s_noise, n_sigmas: int, generator):
    """Karras' churn: (sample raised to sigma_hat, sigma_hat); the sample as it came when gamma = 0."""
    gamma = min(s_churn / (n_sigmas - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        noise = (s_noise * sqrt(sigma_hat**2 - sigma**2), StepNoise(model_output, generator))
        sample = lincomb(sample, [], noise=noise, dtype=promote(sample.dtype, torch.float32))
    return sample, sigma_hat


def euler_update(sample, model_output, x0_coefs, x0, sigma_hat: float, sigma_next: float, dtype, noise=None):
    """sample + (sample - x0)/sigma_hat * (sigma_next - sigma_hat) (+ noise), from (sample, m) when x0 = p x + q m."""
    r = div(sigma_next - sigma_hat, sigma_hat)
    if x0_coefs is None:  # x0 given as a tensor
        return lincomb(sample, [(-r, x0)], x_coef=1 + r, noise=noise, dtype=dtype)
    p, q = x0_coefs
    return lincomb(sample, [(-r * q, model_output)], x_coef=1 + r - r * p, noise=noise, dtype=dtype)


class EulerDiscreteScheduler(_Euler):
    """Euler steps in sigma with Karras churn."""

    def step(
        self,
        model_output,
        timestep,
        sample,
        s_churn=0.0,
        s_tmin=0.0,
        s_tmax=float("inf"),
        s_noise=1.0,
        generator=None,
        return_dict=True,
    ):
        check_timestep(self, timestep, scheduling_euler_discrete.logger)
        sigma = at(self.sigmas, self.step_index)
        sample, sigma_hat = churn(
            sample, model_output, sigma, s_churn, s_tmin, s_tmax, s_noise, len(self.sigmas), generator
        )
        kind = self.config.prediction_type
        coefs = x0_coefs_ve(kind, sigma_hat if kind == "epsilon" else sigma)  # diffusers' own choice of sigmas
        if coefs is None:
            raise ValueError(f"prediction_type given as {kind} must be one of `epsilon`, or `v_prediction`")
        x0 = x0_from(sample, model_output, coefs, promote(torch.float32, model_output.dtype))
        sigma_next = at(self.sigmas, self.step_index + 1)
        prev = euler_update(sample, model_output, coefs, x0, sigma_hat, sigma_next, model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev, x0)
        return EulerDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class EulerAncestralDiscreteScheduler(_EulerAncestral):
    """Euler to sigma_down, then sigma_up of fresh noise, in one pass."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        check_timestep(self, timestep, scheduling_euler_ancestral_discrete.logger)
        sigma = at(self.sigmas, self.step_index)
        coefs = x0_coefs_or_raise(self.config.prediction_type, sigma, sample_ok=False)
        x0 = x0_from(sample, model_output, coefs, promote(torch.float32, model_output.dtype))
        sigma_to = at(self.sigmas, self.step_index + 1)
        sigma_up = sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)
        sigma_down = sqrt(sigma_to**2 - sigma_up**2)
        noise = (sigma_up, StepNoise(model_output, generator))
        prev = euler_update(sample, model_output, coefs, x0, sigma, sigma_down, model_output.dtype, noise)
        self._step_index += 1
        if not return_dict:
            return (prev, x0)
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class EDMEulerScheduler(_EDMEuler):
    """EDM's Euler (Karras et al. 2022) with its preconditioning folded into the coefficients."""

    def _denoiser_coefs(self, sigma: float) -> tuple[float, float]:
        """(c_skip, c_out) of ``precondition_outputs``: x0 = c_skip x + c_out m."""
        sd = self.config.sigma_data
        c_out = sigma * sd / math.sqrt(sigma**2 + sd**2)
        if self.config.prediction_type == "v_prediction":
            c_out = -c_out
        elif self.config.prediction_type != "epsilon":
            raise ValueError(f"Prediction type {self.config.prediction_type} is not supported.")
        return sd**2 / (sigma**2 + sd**2), c_out

    def step(
        self,
        model_output,
        timestep,
        sample,
        s_churn=0.0,
        s_tmin=0.0,
        s_tmax=float("inf"),
        s_noise=1.0,
        generator=None,
        return_dict=True,
        pred_original_sample=None,
    ):
        check_timestep(self, timestep, scheduling_edm_euler.logger)
        sigma = at(self.sigmas, self.step_index)
        sample, sigma_hat = churn(
            sample, model_output, sigma, s_churn, s_tmin, s_tmax, s_noise, len(self.sigmas), generator
        )
        coefs = None
        if pred_original_sample is None:
            coefs = self._denoiser_coefs(sigma_hat)
            dtype = promote(torch.float32, model_output.dtype)
            pred_original_sample = x0_from(sample, model_output, coefs, dtype)
        sigma_next = at(self.sigmas, self.step_index + 1)
        prev = euler_update(
            sample, model_output, coefs, pred_original_sample, sigma_hat, sigma_next, model_output.dtype
        )
        self._step_index += 1
        if not return_dict:
            return (prev, pred_original_sample)
        return EDMEulerSchedulerOutput(prev_sample=prev, pred_original_sample=pred_original_sample)
