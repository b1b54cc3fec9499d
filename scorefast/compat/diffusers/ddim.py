"""The discrete VP schedulers on alphas_cumprod: DDIM, DDPM and LCM.

x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.  Each ``step`` computes its scalars in float64 from
diffusers' own ``alphas_cumprod`` and makes ``prev_sample`` in one fused pass from (sample, model
output, noise); ``pred_original_sample`` / ``denoised`` is its own pass because it is returned.
Clipping and thresholding are diffusers' own (``_threshold_sample``), applied to x0, which then
feeds the update as a term.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler as _DDIM
from diffusers import DDPMScheduler as _DDPM
from diffusers import LCMScheduler as _LCM
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput

from ._common import StepNoise, at, div, eps_coefs_vp, f64, lincomb, need_steps, promote, sqrt, x0_coefs_vp, x0_from


def _clip(scheduler, x0: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """diffusers' thresholding / clipping of x0; (x0, whether it changed anything)."""
    if scheduler.config.thresholding:
        return scheduler._threshold_sample(x0), True
    if scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        return x0.clamp(-r, r), True
    return x0, False


def _x0_coefs(scheduler, abar: float, what: str) -> tuple[float, float]:
    coefs = x0_coefs_vp(scheduler.config.prediction_type, math.sqrt(abar), math.sqrt(1 - abar))
    if coefs is None:
        raise ValueError(
            f"prediction_type given as {scheduler.config.prediction_type} must be one of `epsilon`, `sample` or"
            f" `v_prediction` for {what}."
        )
    return coefs


class DDIMScheduler(_DDIM):
    """DDIM (any eta): prev_sample from (sample, model output, noise) in one pass; x0 in another."""

    def step(
        self,
        model_output,
        timestep,
        sample,
        eta=0.0,
        use_clipped_model_output=False,
        generator=None,
        variance_noise=None,
        return_dict=True,
    ):
        need_steps(self)
        prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
        abar = at(self.alphas_cumprod, timestep)
        abar_prev = at(self.alphas_cumprod, prev_timestep) if prev_timestep >= 0 else f64(self.final_alpha_cumprod)
        a, s = math.sqrt(abar), math.sqrt(1 - abar)
        p, q = _x0_coefs(self, abar, "the DDIMScheduler")
        u, v = eps_coefs_vp(self.config.prediction_type, a, s)
        dtype = promote(sample.dtype, model_output.dtype)
        x0 = x0_from(sample, model_output, (p, q), dtype)
        x0, clipped = _clip(self, x0)
        std = eta * sqrt((1 - abar_prev) / (1 - abar) * (1 - div(abar, abar_prev))) if eta else 0.0  # _get_variance
        direction = sqrt(1 - abar_prev - std**2)
        if use_clipped_model_output:  # eps = (x - a x0) / s from the clipped x0
            terms, x_coef = [(math.sqrt(abar_prev) - direction * div(a, s), x0)], div(direction, s)
        elif clipped:  # sqrt(abar_prev) x0 + direction (u x + v m)
            terms, x_coef = [(math.sqrt(abar_prev), x0), (direction * v, model_output)], direction * u
        else:  # sqrt(abar_prev) (p x + q m) + direction (u x + v m), from x
            terms, x_coef = (
                [(math.sqrt(abar_prev) * q + direction * v, model_output)],
                math.sqrt(abar_prev) * p + direction * u,
            )
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError(
                    "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                    " `variance_noise` stays `None`."
                )
            noise = (std, StepNoise(model_output, generator, variance_noise))
        prev = lincomb(sample, terms, x_coef=x_coef, noise=noise, dtype=dtype)
        if not return_dict:
            return (prev, x0)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class DDPMScheduler(_DDPM):
    """DDPM ancestral steps: the posterior mean and its noise in one pass, for every variance type."""

    def _noise_std(self, t, predicted_variance, abar: float, abar_prev: float):
        """The noise's standard deviation (diffusers' ``_get_variance``): a float from the table's floats for the
        fixed variance types, a tensor for the learned ones."""
        if self.variance_type in ("learned", "learned_range"):
            variance = self._get_variance(t, predicted_variance=predicted_variance)
            return variance**0.5 if self.variance_type == "learned" else torch.exp(0.5 * variance)
        beta_t = 1 - div(abar, abar_prev)
        if self.variance_type in ("fixed_small", "fixed_small_log"):
            return sqrt(max(div(1 - abar_prev, 1 - abar) * beta_t, 1e-20))
        if self.variance_type == "fixed_large":
            return sqrt(beta_t)
        if self.variance_type == "fixed_large_log":  # diffusers takes the square root of log(beta): NaN
            return sqrt(math.log(beta_t)) if beta_t > 0 else math.nan
        return sqrt(f64(self._get_variance(t, predicted_variance=predicted_variance)))

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        t = timestep
        prev_t = self.previous_timestep(t)
        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type in ["learned", "learned_range"]:
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        else:
            predicted_variance = None
        abar = at(self.alphas_cumprod, t)
        abar_prev = at(self.alphas_cumprod, prev_t) if prev_t >= 0 else 1.0
        alpha_t = abar / abar_prev
        beta_t = 1 - alpha_t
        p, q = _x0_coefs(self, abar, "the DDPMScheduler")
        dtype = promote(sample.dtype, model_output.dtype)
        x0 = x0_from(sample, model_output, (p, q), dtype)
        x0, clipped = _clip(self, x0)
        c0 = div(math.sqrt(abar_prev) * beta_t, 1 - abar)  # posterior mean = c0 x0 + cx x
        cx = div(math.sqrt(alpha_t) * (1 - abar_prev), 1 - abar)
        terms, x_coef = ([(c0, x0)], cx) if clipped else ([(c0 * q, model_output)], c0 * p + cx)
        noise = None
        if t > 0:
            std = self._noise_std(t, predicted_variance, abar, abar_prev)
            source = StepNoise(model_output, generator)
            if isinstance(std, torch.Tensor):  # a learned, per-element standard deviation
                z = source.tensor if source.tensor is not None else _dense(source, model_output)
                terms.append((1.0, std * z.to(model_output.dtype)))
                dtype = promote(dtype, terms[-1][1].dtype)
            else:
                noise = (std, source)
        prev = lincomb(sample, terms, x_coef=x_coef, noise=noise, dtype=dtype)
        if not return_dict:
            return (prev, x0)
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


def _dense(source: StepNoise, like: torch.Tensor) -> torch.Tensor:
    """The noise of a one-seed StepNoise as a tensor (where a per-element scale must multiply it)."""
    zeros = torch.zeros(like.shape, device=like.device)
    return lincomb(zeros, [], noise=(1.0, source))


class LCMScheduler(_LCM):
    """Latent consistency steps: denoised = c_skip x + c_out x0, then re-noised to the next time."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        need_steps(self)
        if self.step_index is None:
            self._init_step_index(timestep)
        prev_step_index = self.step_index + 1
        prev_timestep = self.timesteps[prev_step_index] if prev_step_index < len(self.timesteps) else timestep
        abar = at(self.alphas_cumprod, timestep)
        abar_prev = at(self.alphas_cumprod, prev_timestep) if prev_timestep >= 0 else f64(self.final_alpha_cumprod)
        c_skip, c_out = (f64(c) for c in self.get_scalings_for_boundary_condition_discrete(timestep))
        p, q = _x0_coefs(self, abar, "`LCMScheduler`")
        dtype = promote(sample.dtype, model_output.dtype)
        last = self.step_index == self.num_inference_steps - 1
        x0, clipped = None, False
        if self.config.thresholding or self.config.clip_sample:
            x0, clipped = _clip(self, x0_from(sample, model_output, (p, q), dtype))
        if clipped:
            terms, x_coef = [(c_out, x0)], c_skip
        else:
            terms, x_coef = [(c_out * q, model_output)], c_out * p + c_skip
        denoised = lincomb(sample, terms, x_coef=x_coef, dtype=dtype)
        if last:
            prev = denoised
        else:
            r = math.sqrt(abar_prev)
            noise = (math.sqrt(1 - abar_prev), StepNoise(model_output, generator))
            prev = lincomb(sample, [(r * c, t) for c, t in terms], x_coef=r * x_coef, noise=noise, dtype=dtype)
        self._step_index += 1
        if not return_dict:
            return (prev, denoised)
        return LCMSchedulerOutput(prev_sample=prev, denoised=denoised)
