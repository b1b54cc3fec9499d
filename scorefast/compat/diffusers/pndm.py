"""Pseudo numerical methods (PNDM), ``PNDMScheduler``: Runge-Kutta warm-up (PRK) then linear multistep (PLMS).

Both combine stored model outputs ``ets`` with fixed weights and take the DDIM-like transfer
``_get_prev_sample``; here the weighted sum and the transfer are one fused pass (at most four
outputs and the sample), and the PRK accumulator is kept as its terms rather than summed.
"""

from __future__ import annotations

import math

from diffusers import PNDMScheduler as _PNDM
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ._common import at, f64, lincomb, need_steps, promote

_PLMS_WEIGHTS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
_PRK_WEIGHTS = (1 / 6, 1 / 3, 1 / 3)  # the first three stages' outputs; the fourth's takes 1/6


class PNDMScheduler(_PNDM):
    """PRK / PLMS with the weighted model outputs folded into the transfer's coefficients."""

    def _transfer(self, sample, timestep, prev_timestep, eps_terms):
        """``_get_prev_sample`` with the model output given as weighted terms sum(w * e)."""
        abar = at(self.alphas_cumprod, timestep)
        abar_prev = at(self.alphas_cumprod, prev_timestep) if prev_timestep >= 0 else f64(self.final_alpha_cumprod)
        kind = self.config.prediction_type
        x_coef = math.sqrt(abar_prev / abar)
        k = -(abar_prev - abar) / (abar * math.sqrt(1 - abar_prev) + math.sqrt(abar * (1 - abar) * abar_prev))
        if kind == "v_prediction":  # eps = sqrt(abar) v + sqrt(1 - abar) x
            x_coef, k_m = x_coef + k * math.sqrt(1 - abar), k * math.sqrt(abar)
        elif kind == "epsilon":
            k_m = k
        else:
            raise ValueError(f"prediction_type given as {kind} must be one of `epsilon` or `v_prediction`")
        dtype = promote(sample.dtype, *(e.dtype for _, e in eps_terms))
        return lincomb(sample, [(k_m * w, e) for w, e in eps_terms], x_coef=x_coef, dtype=dtype)

    def _get_prev_sample(self, sample, timestep, prev_timestep, model_output):
        return self._transfer(sample, timestep, prev_timestep, [(1.0, model_output)])

    def step_prk(self, model_output, timestep, sample, return_dict=True):
        need_steps(self)
        diff_to_prev = 0 if self.counter % 2 else self.config.num_train_timesteps // self.num_inference_steps // 2
        prev_timestep = timestep - diff_to_prev
        timestep = self.prk_timesteps[self.counter // 4 * 4]
        stage = self.counter % 4
        if stage == 0:
            self._prk_terms = []
            self.ets.append(model_output)
            self.cur_sample = sample
        if stage < 3:
            self._prk_terms.append((_PRK_WEIGHTS[stage], model_output))
            terms = [(1.0, model_output)]
        else:
            terms, self._prk_terms = [*self._prk_terms, (1 / 6, model_output)], []
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        prev_sample = self._transfer(cur_sample, timestep, prev_timestep, terms)
        self.counter += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def step_plms(self, model_output, timestep, sample, return_dict=True):
        need_steps(self)
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError(
                f"{self.__class__} can only be run AFTER scheduler has been run in 'prk' mode for at least 12"
                " iterations See: https://github.com/huggingface/diffusers/blob/main/src/diffusers/pipelines/"
                "pipeline_pndm.py for more information."
            )
        prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            prev_timestep = timestep
            timestep = timestep + self.config.num_train_timesteps // self.num_inference_steps
        if len(self.ets) == 1 and self.counter == 0:
            terms = [(1.0, model_output)]
            self.cur_sample = sample
        elif len(self.ets) == 1 and self.counter == 1:
            terms = [(0.5, model_output), (0.5, self.ets[-1])]
            sample = self.cur_sample
            self.cur_sample = None
        else:
            n = min(len(self.ets), 4)
            terms = list(zip(_PLMS_WEIGHTS[n], self.ets[::-1][:n]))
        prev_sample = self._transfer(sample, timestep, prev_timestep, terms)
        self.counter += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
