"""Fused ops of scorefast (one op a file), each on the torch / cpu / triton / cuda backends.

Every op is a ``torch.library`` custom op (``scorefast::noise``, ``scorefast::fused_update``,
``scorefast::sumsq_norms`` and the mutating ``*_out`` forms) with fake and autograd registrations;
the functions below validate arguments and pick the backend.
"""

from .euler_maruyama_step import euler_maruyama_step
from .fused_update import fused_update
from .langevin_step import langevin_step
from .noise import noise
from .sample_norm import sample_norm, sample_sumsq
from .snr_langevin_step import snr_langevin_step

__all__ = [
    "euler_maruyama_step",
    "fused_update",
    "langevin_step",
    "noise",
    "sample_norm",
    "sample_sumsq",
    "snr_langevin_step",
]
