"""Linear multistep in sigma, ``LMSDiscreteScheduler``: prev = x + sum_k c_k d_k in one pass.

The coefficients are the exact integrals of the Lagrange basis over [sigma_i, sigma_{i+1}]
(``get_lms_coefficient``; diffusers integrates them with ``scipy.integrate.quad`` at epsrel 1e-4).
"""

from __future__ import annotations

import warnings

from diffusers import LMSDiscreteScheduler as _LMS
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteSchedulerOutput

from .._fused import lagrange_integral
from ._common import at, lincomb, promote, x0_from
from .euler import x0_coefs_or_raise
from .heun import derivative_terms


class LMSDiscreteScheduler(_LMS):
    """k-diffusion's LMS: derivatives (x - x0)/sigma kept in ``derivatives``, combined with exact weights."""

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """int_{sigma_t}^{sigma_{t+1}} of the Lagrange basis polynomial ``current_order`` over the last
        ``order`` sigmas, exactly (float64)."""
        nodes = [at(self.sigmas, t - k) for k in range(order)]
        return lagrange_integral(nodes, current_order, at(self.sigmas, t), at(self.sigmas, t + 1))

    def step(self, model_output, timestep, sample, order=4, return_dict=True):
        if not self.is_scale_input_called:
            warnings.warn(
                "The `scale_model_input` function should be called before `step` to ensure correct denoising. "
                "See `StableDiffusionPipeline` for a usage example.",
                stacklevel=2,
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = at(self.sigmas, self.step_index)
        coefs = x0_coefs_or_raise(self.config.prediction_type, sigma)
        dtype = promote(sample.dtype, model_output.dtype)
        x0 = x0_from(sample, model_output, coefs, dtype)
        x_coef, terms = derivative_terms(sample, model_output, coefs, x0, sigma, 1.0)
        self.derivatives.append(lincomb(sample, terms, x_coef=x_coef, dtype=dtype))
        if len(self.derivatives) > order:
            self.derivatives.pop(0)
        order = min(self.step_index + 1, order)
        weights = [self.get_lms_coefficient(order, self.step_index, k) for k in range(order)]
        ds = list(reversed(self.derivatives))
        prev = lincomb(sample, list(zip(weights, ds)), dtype=promote(dtype, *(d.dtype for d in ds[:order])))
        self._step_index += 1
        if not return_dict:
            return (prev, x0)
        return LMSDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
