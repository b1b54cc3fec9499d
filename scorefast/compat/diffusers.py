"""diffusers schedulers whose arithmetic runs on scorefast's fused ops (needs ``pip install diffusers``).

Each class subclasses diffusers' own, so the config, ``from_pretrained`` / ``save_pretrained``,
``set_timesteps``, ``timesteps``, ``sigmas`` (diffusers' own tables, e.g. Euler's
``interpolation_type="linear"``), ``step_index`` and the output classes are diffusers'; only the
update arithmetic is replaced by one fused pass (``sf.ops.fused_update`` / ``snr_langevin_step``).

Noise: every call that draws noise takes one 64-bit seed from ``generator`` (or, without one, from
torch's default CPU generator, so ``torch.manual_seed`` governs it) and uses the Philox stream
(stream 0, sample ids arange(B), k = 0): sample b's noise does not depend on the batch size.
``philox_seed(generator)`` is that draw.  DPMSolverMultistep's SDE variants get the same noise
as ``variance_noise``; its ``dpmsolver`` / ``sde-dpmsolver`` types and third-order updates keep
diffusers' arithmetic.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler as _DDIM
from diffusers import DPMSolverMultistepScheduler as _DPM
from diffusers import EulerDiscreteScheduler as _Euler
from diffusers import ScoreSdeVeScheduler as _SdeVe
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_sde_ve import SdeVeOutput
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from .. import rng
from ..ops import snr_langevin_step
from ..rng import philox_seed
from ._fused import FusedUpdater

__all__ = [
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "ScoreSdeVeScheduler",
    "philox_seed",
]


_fused = FusedUpdater()


def philox_noise(shape, generator, device, dtype=torch.float32) -> torch.Tensor:
    """The noise these schedulers draw for ``shape`` (what a patched ``randn_tensor`` must return)."""
    return rng.randn(tuple(shape), seed=philox_seed(generator), step=0, stream=0, device=device, dtype=dtype)


def _f(v) -> float:
    return float(v.item() if isinstance(v, torch.Tensor) else v)


class ScoreSdeVeScheduler(_SdeVe):
    """score_sde's VE predictor (reverse diffusion) and Langevin corrector (batch-mean norms)."""

    def step_pred(self, model_output, timestep, sample, generator=None, return_dict=True):
        if self.timesteps is None:
            raise ValueError(
                "`self.timesteps` is not set, you need to run 'set_timesteps' after creating the scheduler"
            )
        timestep = timestep * torch.ones(sample.shape[0], device=sample.device)
        timesteps = (timestep * (len(self.timesteps) - 1)).long().to(self.discrete_sigmas.device)
        sigma = self.discrete_sigmas[timesteps].to(sample.device)
        adjacent_sigma = self.get_adjacent_sigma(timesteps, timestep).to(sample.device)
        g2 = (sigma**2 - adjacent_sigma**2).to(torch.float32)  # diffusion^2 per sample [B]
        x = sample.float()
        score = model_output
        mean = _fused(x, [(g2, score)])
        prev = _fused(x, [(g2, score)], noise=g2.sqrt(), seed=philox_seed(generator), step=0)
        prev, mean = prev.to(sample.dtype), mean.to(sample.dtype)
        if not return_dict:
            return (prev, mean)
        return SdeVeOutput(prev_sample=prev, prev_sample_mean=mean)

    def step_correct(self, model_output, sample, generator=None, return_dict=True):
        if self.timesteps is None:
            raise ValueError(
                "`self.timesteps` is not set, you need to run 'set_timesteps' after creating the scheduler"
            )
        x, _ = snr_langevin_step(
            sample.float(),
            model_output,
            float(self.config.snr),
            norm="batch",
            seed=philox_seed(generator),
            step=0,
            stream=0,
        )
        x = x.to(sample.dtype)
        if not return_dict:
            return (x,)
        return SchedulerOutput(prev_sample=x)


class EulerDiscreteScheduler(_Euler):
    """Euler steps in sigma with Karras churn; x0 and the step in one fused pass each."""

    def _x0_coefs(self, sigma: float, sigma_hat: float) -> tuple[float, float]:
        """pred_original_sample = a * sample + b * model_output for the configured prediction type."""
        kind = self.config.prediction_type
        if kind in ("original_sample", "sample"):
            return 0.0, 1.0
        if kind == "epsilon":
            return 1.0, -sigma_hat
        if kind == "v_prediction":
            return 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5
        raise ValueError(f"prediction_type given as {kind} must be one of `epsilon`, or `v_prediction`")

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
        if isinstance(timestep, int | torch.IntTensor | torch.LongTensor):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to `EulerDiscreteScheduler"
                ".step()` is not supported. Make sure to pass one of the `scheduler.timesteps` as a timestep."
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)
        sigma = _f(self.sigmas[self.step_index])
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            sample = _fused(
                sample,
                [],
                noise=s_noise * (sigma_hat**2 - sigma**2) ** 0.5,
                seed=philox_seed(generator),
                step=0,
            )
        a, b = self._x0_coefs(sigma, sigma_hat)
        x0 = _fused(sample, [(b, model_output)], x_coef=a)
        # sample + (sample - x0) / sigma_hat * dt
        r = (_f(self.sigmas[self.step_index + 1]) - sigma_hat) / sigma_hat
        prev = _fused(sample, [(-r, x0)], x_coef=1 + r).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev, x0)
        return EulerDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class DDIMScheduler(_DDIM):
    """DDIM (eta >= 0); x0, epsilon and the step as fused passes, clipping/thresholding kept."""

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
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
        abar = _f(self.alphas_cumprod[timestep])
        abar_prev = _f(self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod)
        a, s = abar**0.5, (1 - abar) ** 0.5
        kind = self.config.prediction_type
        coefs = {  # (x0 = p*x + q*m, eps = u*x + v*m)
            "epsilon": ((1 / a, -s / a), (0.0, 1.0)),
            "sample": ((0.0, 1.0), (1 / s, -a / s)),
            "v_prediction": ((a, -s), (s, a)),
        }
        if kind not in coefs:
            raise ValueError(f"prediction_type given as {kind} must be one of `epsilon`, `sample`, or `v_prediction`")
        (p, q), (u, v) = coefs[kind]
        x = sample.float()
        x0 = _fused(x, [(q, model_output)], x_coef=p)
        clipped = bool(self.config.thresholding or self.config.clip_sample)
        if self.config.thresholding:
            x0 = self._threshold_sample(x0)
        elif self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        std = eta * _f(self._get_variance(timestep, prev_timestep)) ** 0.5
        direction = (1 - abar_prev - std**2) ** 0.5
        if use_clipped_model_output or clipped:
            eps_x, eps_x0 = (1 / s, -a / s) if use_clipped_model_output else (None, None)
            if eps_x is not None:  # eps from the clipped x0: (x - a x0) / s
                eps = _fused(x, [(eps_x0, x0)], x_coef=eps_x)
            else:
                eps = model_output if kind == "epsilon" else _fused(x, [(v, model_output)], x_coef=u)
            terms, x_coef, base = [(direction, eps)], abar_prev**0.5, x0
        else:  # unclipped: prev = sqrt(abar_prev) (p x + q m) + direction (u x + v m), one pass from x
            x_coef = abar_prev**0.5 * p + direction * u
            terms, base = [(abar_prev**0.5 * q + direction * v, model_output)], x
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError(
                    "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                    " `variance_noise` stays `None`."
                )
            if variance_noise is not None:
                prev = _fused(base, [*terms, (std, variance_noise)], x_coef=x_coef)
            else:
                prev = _fused(base, terms, x_coef=x_coef, noise=std, seed=philox_seed(generator), step=0)
        else:
            prev = _fused(base, terms, x_coef=x_coef)
        prev = prev.to(sample.dtype)
        if not return_dict:
            return (prev, x0)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class DPMSolverMultistepScheduler(_DPM):
    """DPM-Solver++ (2M, and its SDE form) with fused first/second-order updates; Philox SDE noise."""

    _FUSED = ("dpmsolver++", "sde-dpmsolver++")

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True):
        if self.config.algorithm_type in ("sde-dpmsolver", "sde-dpmsolver++") and variance_noise is None:
            variance_noise = philox_noise(model_output.shape, generator, model_output.device)
        return super().step(
            model_output, timestep, sample, generator=None, variance_noise=variance_noise, return_dict=return_dict
        )

    def _coefs(self, idx: list[int]):
        """((alpha, sigma) pairs, lambdas = log alpha - log sigma) at the sigma-table positions idx, as floats."""
        sig = [self._sigma_to_alpha_sigma_t(self.sigmas[i]) for i in idx]
        lam = [_f(torch.log(al) - torch.log(si)) for al, si in sig]
        return [(_f(al), _f(si)) for al, si in sig], lam

    def dpm_solver_first_order_update(self, model_output, *args, sample=None, noise=None, **kwargs):
        if self.config.algorithm_type not in self._FUSED or args or kwargs:
            return super().dpm_solver_first_order_update(model_output, *args, sample=sample, noise=noise, **kwargs)
        i = self.step_index
        ((alpha_t, sigma_t), (_, sigma_s)), (lam_t, lam_s) = self._coefs([i + 1, i])
        h = lam_t - lam_s
        x = sample
        if self.config.algorithm_type == "dpmsolver++":
            return _fused(x, [(-alpha_t * math.expm1(-h), model_output)], x_coef=sigma_t / sigma_s).to(sample.dtype)
        e2 = math.exp(-2.0 * h)
        return _fused(
            x,
            [(alpha_t * (1 - e2), model_output), (sigma_t * (1.0 - e2) ** 0.5, noise)],
            x_coef=sigma_t / sigma_s * math.exp(-h),
        ).to(sample.dtype)

    def multistep_dpm_solver_second_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        if self.config.algorithm_type not in self._FUSED or args or kwargs:
            return super().multistep_dpm_solver_second_order_update(
                model_output_list, *args, sample=sample, noise=noise, **kwargs
            )
        i = self.step_index
        ((alpha_t, sigma_t), (_, sigma_s0), _), (lam_t, lam_s0, lam_s1) = self._coefs([i + 1, i, i - 1])
        m0, m1 = model_output_list[-1], model_output_list[-2]
        h, h_0 = lam_t - lam_s0, lam_s0 - lam_s1
        r0 = h_0 / h
        heun = self.config.solver_type == "heun"
        if self.config.algorithm_type == "dpmsolver++":
            c0 = -alpha_t * math.expm1(-h)
            c1 = (alpha_t * (math.expm1(-h) / h + 1.0)) if heun else 0.5 * c0
            x_coef, extra = sigma_t / sigma_s0, []
        else:
            e2 = math.exp(-2.0 * h)
            c0 = alpha_t * (1 - e2)
            c1 = alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0) if heun else 0.5 * c0
            x_coef = sigma_t / sigma_s0 * math.exp(-h)
            extra = [(sigma_t * (1.0 - e2) ** 0.5, noise)]
        # c0 D0 + c1 D1 with D0 = m0, D1 = (m0 - m1) / r0
        terms = [(c0 + c1 / r0, m0), (-c1 / r0, m1), *extra]
        return _fused(sample, terms, x_coef=x_coef).to(sample.dtype)
