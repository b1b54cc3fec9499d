"""Rectified-flow schedulers (x = (1 - sigma) x0 + sigma eps, model output v = eps - x0):
FlowMatchEulerDiscrete (shift, dynamic shifting with ``mu``, stochastic sampling) and FlowMatchHeunDiscrete.

Each step is one fused pass from (sample, velocity[, stored sample and derivative], noise).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler as _FlowEuler
from diffusers import FlowMatchHeunDiscreteScheduler as _FlowHeun
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_flow_match_heun_discrete import FlowMatchHeunDiscreteSchedulerOutput

from ._common import StepNoise, at, div, f64, lincomb, promote
from .euler import check_timestep, churn


class FlowMatchEulerDiscreteScheduler(_FlowEuler):
    """x + (sigma_next - sigma) v; with ``stochastic_sampling``, (1 - sigma_next)(x - sigma v) + sigma_next z.

    ``per_token_timesteps`` (per-token sigmas) keeps diffusers' arithmetic: its coefficients are
    tensors shaped like the tokens, not one number per sample.
    """

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
        per_token_timesteps=None,
        return_dict=True,
    ):
        if per_token_timesteps is not None:
            return super().step(
                model_output,
                timestep,
                sample,
                s_churn=s_churn,
                s_tmin=s_tmin,
                s_tmax=s_tmax,
                s_noise=s_noise,
                generator=generator,
                per_token_timesteps=per_token_timesteps,
                return_dict=return_dict,
            )
        check_timestep(self, timestep)
        sigma, sigma_next = at(self.sigmas, self.step_index), at(self.sigmas, self.step_index + 1)
        if self.config.stochastic_sampling:
            noise = (sigma_next, StepNoise(sample, generator))
            terms, x_coef = [(-(1 - sigma_next) * sigma, model_output)], 1 - sigma_next
            prev = lincomb(sample, terms, x_coef=x_coef, noise=noise, dtype=model_output.dtype)
        else:
            prev = lincomb(sample, [(sigma_next - sigma, model_output)], dtype=model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)


class FlowMatchHeunDiscreteScheduler(_FlowHeun):
    """Heun's method on the flow ODE dx/dsigma = v, with Karras churn."""

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
        check_timestep(self, timestep)
        first = self.state_in_first_order
        i = self.step_index
        sigma, sigma_next = (
            (at(self.sigmas, i), at(self.sigmas, i + 1)) if first else (at(self.sigmas, i - 1), at(self.sigmas, i))
        )
        sample, sigma_hat = churn(
            sample, model_output, sigma, s_churn, s_tmin, s_tmax, s_noise, len(self.sigmas), generator
        )
        if first:  # derivative (x - (x - sigma v)) / sigma_hat = v sigma / sigma_hat
            dt = sigma_next - sigma_hat
            derivative = lincomb(
                model_output, [], x_coef=div(sigma, sigma_hat), dtype=promote(torch.float32, model_output.dtype)
            )
            prev = lincomb(sample, [(dt * div(sigma, sigma_hat), model_output)], dtype=model_output.dtype)
            self.prev_derivative, self.dt, self.sample = derivative, self.sigmas[i + 1] - sigma_hat, sample
            self._dt64 = dt  # diffusers keeps dt as a float32 tensor; the second stage uses it in float64
        else:  # x1 + dt/2 (d1 + v)
            dt = self.__dict__.pop("_dt64", None)
            dt = f64(self.dt) if dt is None else dt
            prev = lincomb(
                self.sample, [(dt / 2, self.prev_derivative), (dt / 2, model_output)], dtype=model_output.dtype
            )
            self.prev_derivative = self.dt = self.sample = None
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return FlowMatchHeunDiscreteSchedulerOutput(prev_sample=prev)
