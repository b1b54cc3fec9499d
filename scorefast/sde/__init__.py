"""SDEs of score-based models: VE, VP, sub-VP (Song et al. 2021), EDM (Karras et al. 2022), DiscreteVP,
RectifiedFlow (flow matching)."""

from .base import SDE
from .discrete_vp import DiscreteVP
from .edm import EDM, karras_sigmas
from .rectified_flow import RectifiedFlow
from .ve import VESDE
from .vp import VPSDE, SubVPSDE

__all__ = ["EDM", "SDE", "VESDE", "VPSDE", "DiscreteVP", "RectifiedFlow", "SubVPSDE", "karras_sigmas"]
