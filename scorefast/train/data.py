"""Training data that needs no download: scikit-learn's 8x8 digits and a 2-D mixture ring.

``batch_indices`` picks each step's batch from the Philox stream (user stream 16, training step k),
so the batches of a resumed run are those of an uninterrupted one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rng import FIRST_USER_STREAM, rand

STREAM_DATA = FIRST_USER_STREAM
DATASETS = ("digits", "toy2d")


def digits() -> Tensor:
    """scikit-learn's digits (1797 images) as float32 [1797, 1, 8, 8] in [-1, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("data: 'digits' needs scikit-learn (pip install scikit-learn)") from err
    images = torch.from_numpy(load_digits().images).float()
    return (images / 16.0 * 2.0 - 1.0)[:, None]


def toy2d(n: int = 20000, seed: int = 0) -> Tensor:
    """n exact draws [n, 2] of the built-in ring (``GaussianMixture.builtin()``)."""
    from ..testing import GaussianMixture

    return GaussianMixture.builtin().sample(n, seed=seed).float()


def load(name: str) -> Tensor:
    if name == "digits":
        return digits()
    if name == "toy2d":
        return toy2d()
    raise ValueError(f"data: expected one of {', '.join(DATASETS)}, got {name!r}")


def batch_indices(n_data: int, batch: int, *, seed: int, step: int, offset: int = 0) -> Tensor:
    """[batch] indices into the data set for training step ``step`` (with replacement);
    ``offset`` is the first global sample id (ranks / micro-batches draw disjoint ids)."""
    ids = torch.arange(offset, offset + batch, dtype=torch.int64)
    u = rand((batch, 1), seed=seed, step=step, stream=STREAM_DATA, sample_ids=ids, dtype=torch.float64)[:, 0]
    return (u * n_data).long().clamp_max(n_data - 1)
