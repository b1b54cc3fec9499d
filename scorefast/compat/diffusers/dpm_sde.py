"""``DPMSolverSDEScheduler``: DPM-Solver++(2S) SDE (k-diffusion's sample_dpmpp_sde) on the fused ops.

Its noise stays diffusers' own: a ``BrownianTreeNoiseSampler`` (torchsde) seeded by
``noise_sampler_seed``.  The scheme needs the noise of its two stages to be increments of one Brownian
path (the second stage's interval contains the first's), which independent per-step Philox draws are
not; so only the arithmetic changes, and with the same seed the samples equal diffusers'.
"""

from __future__ import annotations

import math

from diffusers import DPMSolverSDEScheduler as _DPMSDE
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler, DPMSolverSDESchedulerOutput

from ._common import f64, lincomb, promote, sqrt, x0_from
from .euler import x0_coefs_or_raise


def _t(sigma: float) -> float:
    """t = -log(sigma) (+inf at sigma = 0)."""
    return math.inf if sigma == 0 else -math.log(sigma)


class DPMSolverSDEScheduler(_DPMSDE):
    """Each interval: an ancestral step to the log-midpoint, then the full step from the stored sample."""

    def step(self, model_output, timestep, sample, return_dict=True, s_noise=1.0):
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.noise_sampler is None:
            min_sigma, max_sigma = self.sigmas[self.sigmas > 0].min(), self.sigmas.max()
            self.noise_sampler = BrownianTreeNoiseSampler(
                sample, min_sigma.item(), max_sigma.item(), self.noise_sampler_seed
            )
        first = self.state_in_first_order
        i = self.step_index
        sigma_t, next_t = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        sigma, sigma_next = f64(sigma_t), f64(next_t)
        t, t_next = _t(sigma), _t(sigma_next)
        t_mid = t + (t_next - t) * 0.5
        coefs = x0_coefs_or_raise(self.config.prediction_type, sigma if first else math.exp(-t_mid), sample_ok=False)
        dtype = promote(sample.dtype, model_output.dtype)
        x0 = x0_from(sample, model_output, coefs, dtype)
        p, q = coefs
        if sigma_next == 0:  # sample + (sample - x0)/sigma * (0 - sigma) = x0, from (sample, m)
            prev = lincomb(sample, [(q, model_output)], x_coef=p, dtype=dtype)
        else:
            base = sample if first else self.sample
            if first:
                t_next = t_mid
            sigma_to = math.exp(-t_next)
            sigma_up = min(sigma_to, sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2))
            sigma_down = sqrt(sigma_to**2 - sigma_up**2)
            ratio, c = sigma_down / sigma, -math.expm1(t - _t(sigma_down))  # base*ratio + c*x0
            noise = self.noise_sampler(*self._noise_interval(sigma_t, next_t, first))
            terms = [(c * p, sample), (c * q, model_output), (s_noise * sigma_up, noise)]
            if base is sample:
                terms, ratio = terms[1:], ratio + c * p
            prev = lincomb(base, terms, x_coef=ratio, dtype=promote(dtype, base.dtype, noise.dtype))
            if first:
                self.sample, self.mid_point_sigma = sample, self._mid_sigma(sigma_t, next_t)
            else:
                self.sample = self.mid_point_sigma = None
        self._step_index += 1
        if not return_dict:
            return (prev, x0)
        return DPMSolverSDESchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    @staticmethod
    def _mid_sigma(sigma, sigma_next):
        """diffusers' midpoint sigma as it computes it (float32 tensors): exp(-(t + (t_next - t) / 2))."""
        t, t_next = sigma.log().neg(), sigma_next.log().neg()
        return (t + (t_next - t) * 0.5).neg().exp()

    def _noise_interval(self, sigma, sigma_next, first: bool):
        """The (sigma, sigma_next) diffusers asks its noise sampler for, computed as it does, so the
        Brownian tree is queried at the same float32 times and gives the same noise."""
        t = sigma.log().neg()
        t_next = sigma_next.log().neg()
        if first:
            t_next = t + (t_next - t) * 0.5
        return t.neg().exp(), t_next.neg().exp()
