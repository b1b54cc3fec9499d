"""Fused ops of scorefast (one op a file), each on the torch / cpu / triton / cuda backends.

Every op is a ``torch.library`` custom op (``scorefast::noise``, ``scorefast::fused_update``,
``scorefast::sumsq_norms`` and the mutating ``*_out`` forms) with fake and autograd registrations;
the functions below validate arguments and pick the backend.  The step ops of a captured sampler
step (``scorefast::fused_update_step``, ``scorefast::snr_langevin_step`` and their ``*_out`` forms)
read a per-run coefficient table at a device step counter and set a non-finite flag; they mutate
the flag, so they have fake registrations and refuse gradients.
"""

from .euler_maruyama_step import euler_maruyama_step
from .fused_update import fused_update, fused_update_table
from .langevin_step import langevin_step
from .noise import noise
from .sample_norm import sample_norm, sample_sumsq
from .snr_langevin_step import snr_langevin_step

__all__ = [
    "euler_maruyama_step",
    "fused_update",
    "fused_update_table",
    "langevin_step",
    "noise",
    "sample_norm",
    "sample_sumsq",
    "snr_langevin_step",
]
