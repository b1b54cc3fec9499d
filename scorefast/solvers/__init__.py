"""ODE solvers shared by samplers and the likelihood."""

from .adaptive import SolverError
from .rk45 import Solution, solve

__all__ = ["Solution", "SolverError", "solve"]
