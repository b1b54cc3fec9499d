"""scorefast: a compiled sampling engine for score-based generative models.

Noise (``randn``, ``rand``, ``rademacher``) follows one counter-based Philox stream that is the
same on every backend and independent of the batch; ``scorefast.ops`` holds the fused update
kernels.  Importing never loads a compiled extension or queries a GPU, unless
``SCOREFAST_REQUIRE_BACKENDS`` asks for a backend to be checked.
"""

from . import adapters, backends, conditional, distributed, graphs, losses, models, ops, samplers, sde, testing, train
from .backends import BackendUnavailableError
from .compiling import compile
from .divergence import divergence, hutchinson_trace
from .errors import NonFiniteError
from .likelihood import log_likelihood
from .rng import rademacher, rand, randn
from .sampling import sample

__version__ = "0.1.0"

backends.check_required()

__all__ = [
    "BackendUnavailableError",
    "NonFiniteError",
    "adapters",
    "backends",
    "compile",
    "conditional",
    "distributed",
    "divergence",
    "graphs",
    "hutchinson_trace",
    "log_likelihood",
    "losses",
    "models",
    "ops",
    "rademacher",
    "rand",
    "randn",
    "sample",
    "samplers",
    "sde",
    "testing",
    "train",
]
