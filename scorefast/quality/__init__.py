"""The time-to-quality benchmark's pieces (DESIGN.md "Time-to-quality"): targets with exact scores,
sliced W1 with its Monte-Carlo floor, and the Fréchet distance on a small digits classifier."""

from .metrics import N_PROJECTIONS, frechet_distance, mc_floor, sliced_w1
from .targets import TARGETS, RotatedMixture, Target, random_mixture

__all__ = [
    "N_PROJECTIONS",
    "TARGETS",
    "RotatedMixture",
    "Target",
    "frechet_distance",
    "mc_floor",
    "random_mixture",
    "sliced_w1",
]
