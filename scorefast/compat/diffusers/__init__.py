"""diffusers schedulers whose arithmetic runs on scorefast's fused ops (needs ``pip install diffusers``).

Every scheduler of diffusers' ``KarrasDiffusionSchedulers`` (DDIM, DDPM, PNDM, LMSDiscrete,
EulerDiscrete, HeunDiscrete, EulerAncestralDiscrete, DPMSolverMultistep, DPMSolverSinglestep,
KDPM2Discrete, KDPM2AncestralDiscrete, DEISMultistep, UniPCMultistep, DPMSolverSDE, EDMEuler) plus
FlowMatchEulerDiscrete, FlowMatchHeunDiscrete, LCM and ScoreSdeVe.  Each subclasses diffusers' own
class of the same name, so the config, ``from_pretrained`` / ``save_pretrained`` / ``from_config``,
``set_timesteps``, ``timesteps``, ``sigmas`` (diffusers' own tables), ``step_index``, the ``step``
signature and the output classes and dtypes are diffusers'; only the update arithmetic is replaced:
one ``sf.ops.fused_update`` pass (x_coef x + sum c_j t_j + noise z, z made in-kernel) per update.

Noise (DESIGN.md "Drop-in coverage"): a step that draws noise takes one 64-bit seed from
``generator`` (or, without one, from torch's default CPU generator, so ``torch.manual_seed``
governs it) and uses the Philox stream (stream 0, step 0, sample ids arange(B)): sample b's noise
does not depend on the batch size.  A list of B generators gives each sample its own key (a seed
from generator b, sample id 0), so image b's noise depends on generator b alone.  ``variance_noise``
is used as given.  ``philox_noise(shape, generator)`` is exactly that draw.  DPMSolverSDE keeps
diffusers' own Brownian-tree noise (see ``dpm_sde``).

Deviations from diffusers 0.42, on purpose:
- equal consecutive sigmas (h = 0: karras / lu / exponential / beta sigmas with
  ``final_sigmas_type="sigma_min"``) return the sample in every update; diffusers' DPM-Solver heun
  and third-order updates and UniPC's higher orders return NaN there;
- a step whose diffusers coefficients are not finite (e.g. DDPM ``variance_type="fixed_large_log"``,
  whose log variance diffusers takes the square root of) raises ValueError instead of returning NaN;
- LMS coefficients are exact integrals (diffusers: ``scipy.integrate.quad``, epsrel 1e-4);
- FlowMatchEuler's ``per_token_timesteps`` and UniPC's ``solver_p`` keep diffusers' arithmetic.

Pipelines: the classes report this package as their module, and it exports diffusers'
``SchedulerMixin``, so a pipeline saved with one of them (``model_index.json`` names
``["scorefast.compat.diffusers", "<Name>Scheduler"]``) loads back with it through
``DiffusionPipeline.from_pretrained`` once ``scorefast.compat.diffusers`` is imported (diffusers
imports no module a repository names).
"""

from __future__ import annotations

from diffusers import SchedulerMixin  # diffusers' pipeline loader looks it up in this module)

from ...rng import philox_seed
from ._common import philox_noise
from .ddim import DDIMScheduler, DDPMScheduler, LCMScheduler
from .deis import DEISMultistepScheduler
from .dpm_sde import DPMSolverSDEScheduler
from .dpm_solver import DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler
from .euler import EDMEulerScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .flow import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from .heun import HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PNDMScheduler
from .sde_ve import ScoreSdeVeScheduler
from .unipc import UniPCMultistepScheduler

SCHEDULERS = (
    DDIMScheduler,
    DDPMScheduler,
    PNDMScheduler,
    LMSDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    KDPM2DiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    DEISMultistepScheduler,
    UniPCMultistepScheduler,
    DPMSolverSDEScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    LCMScheduler,
    ScoreSdeVeScheduler,
)

for _cls in SCHEDULERS:  # save_pretrained records this public module, which the loader then searches
    _cls.__module__ = __name__

__all__ = [cls.__name__ for cls in SCHEDULERS] + ["SCHEDULERS", "SchedulerMixin", "philox_noise", "philox_seed"]
