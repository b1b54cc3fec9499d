"""ODE solvers shared by samplers and the likelihood."""

from .rk45 import Solution, solve

__all__ = ["Solution", "solve"]
