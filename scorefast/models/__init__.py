"""Networks the package ships and trains: ``MLP`` (2-D data), ``UNet`` (small images), checkpoints.

``build(arch, **kwargs)`` makes a model whose checkpoint (``save``) can be rebuilt by ``load``
with no pickle; ``digits_checkpoint()`` is the shipped 8x8-digits model's path.
"""

from importlib.resources import files
from pathlib import Path

from .checkpoint import ARCHS, build, load, load_model, read_metadata, save
from .mlp import MLP
from .unet import UNet


def digits_checkpoint() -> Path:
    """Path of the shipped digits model (``scorefast/assets/digits.safetensors``)."""
    return Path(str(files("scorefast") / "assets" / "digits.safetensors"))


__all__ = ["ARCHS", "MLP", "UNet", "build", "digits_checkpoint", "load", "load_model", "read_metadata", "save"]
