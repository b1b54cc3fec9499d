"""Training utilities: ``EMA`` (``TrainStep`` and the digits model are not built yet)."""

from .ema import EMA

__all__ = ["EMA"]
