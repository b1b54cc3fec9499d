"""score_sde's VE predictor (reverse diffusion) and Langevin corrector, ``ScoreSdeVeScheduler``."""

from __future__ import annotations

import torch
from diffusers import ScoreSdeVeScheduler as _SdeVe
from diffusers.schedulers.scheduling_sde_ve import SdeVeOutput
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ... import _checks, backends
from ...ops import snr_langevin_step
from ._common import StepNoise, lincomb, promote


def _need_timesteps(scheduler) -> None:
    if scheduler.timesteps is None:
        raise ValueError("`self.timesteps` is not set, you need to run 'set_timesteps' after creating the scheduler")


class ScoreSdeVeScheduler(_SdeVe):
    """Predictor x + g^2 s (+ g z) and corrector x + e s + sqrt(2e) z (batch-mean norms, as diffusers)."""

    def step_pred(self, model_output, timestep, sample, generator=None, return_dict=True):
        _need_timesteps(self)
        timestep = timestep * torch.ones(sample.shape[0], device=sample.device)
        timesteps = (timestep * (len(self.timesteps) - 1)).long().to(self.discrete_sigmas.device)
        sigma = self.discrete_sigmas[timesteps].to(sample.device)
        adjacent_sigma = self.get_adjacent_sigma(timesteps, timestep).to(sample.device)
        g2 = (sigma.double() ** 2 - adjacent_sigma.double() ** 2).float()  # diffusion^2 per sample [B]
        dtype = promote(sample.dtype, model_output.dtype, sigma.dtype)
        noise = StepNoise(sample, generator)
        mean = lincomb(sample, [(g2, model_output)], dtype=dtype)
        prev = lincomb(mean, [], noise=(g2.sqrt(), noise), dtype=dtype)
        if not return_dict:
            return (prev, mean)
        return SdeVeOutput(prev_sample=prev, prev_sample_mean=mean)

    def step_correct(self, model_output, sample, generator=None, return_dict=True):
        _need_timesteps(self)
        dtype = promote(sample.dtype, model_output.dtype, torch.float32)
        noise = StepNoise(sample, generator)
        if noise.tensor is None and dtype == torch.float32:
            x = sample.float()
            _checks.check_like("model_output", model_output, x)
            x, _ = snr_langevin_step(  # checked here once: the op's trusted path skips its per-call checks
                x,
                model_output,
                float(self.config.snr),
                norm="batch",
                seed=noise.seed,
                step=0,
                stream=0,
                sample_ids=torch.arange(x.shape[0], device=x.device),
                backend=backends.resolve(None, x.device, x.dtype),
                _trusted=True,
            )
        else:  # a list of generators (one key per sample) or float64: the noise as a tensor
            z = (
                noise.tensor
                if noise.tensor is not None
                else lincomb(torch.zeros_like(sample, dtype=dtype), [], noise=(1.0, noise))
            )
            grad_norm = torch.norm(model_output.reshape(model_output.shape[0], -1), dim=-1).mean()
            noise_norm = torch.norm(z.reshape(z.shape[0], -1), dim=-1).mean()
            eps = float((self.config.snr * noise_norm / grad_norm) ** 2 * 2)
            x = lincomb(sample, [(eps, model_output), ((2 * eps) ** 0.5, z.to(dtype))], dtype=dtype)
        x = x.to(dtype)
        if not return_dict:
            return (x,)
        return SchedulerOutput(prev_sample=x)
