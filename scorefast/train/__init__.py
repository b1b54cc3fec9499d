"""Training: ``TrainStep`` (AMP, GradScaler, clipping, warmup, exact resume), ``EMA``, ``fit`` (the
``scorefast train`` loop with checkpoints, loss curve and resume)."""

from .ema import EMA
from .step import TrainStep

__all__ = ["EMA", "TrainStep"]
