"""A Fréchet distance for 8x8 digits: features of a small classifier trained on scikit-learn's digits.

The classifier (64 -> 128 -> 32 -> 10, SiLU) is trained in a few seconds, deterministically: a
fixed seed, one thread, full-batch Adam over a fixed split (``train_split``), so every run and
every machine of one torch build gets the same weights.  ``features`` are its 32-wide penultimate
activations, on images in the model's data range [-1, 1] (samples are clipped to it first, as an
image would be on saving).  ``frechet_distance`` compares their Gaussian fits as FID does with
Inception features.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from ..train.data import digits as real_digits
from .metrics import frechet_distance

SEED = 0
STEPS = 300
FEATURES = 32


@contextmanager
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_split(n: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train images, train labels, held-out images, held-out labels) of the real digits: a fixed
    permutation (seed 0), the last 20% held out.  Images [n, 64] float32 in [-1, 1]."""
    from sklearn.datasets import load_digits

    x = real_digits().reshape(-1, 64)
    y = torch.from_numpy(load_digits().target).long()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(x))
    return x[:cut], y[:cut], x[cut:], y[cut:]


class DigitsClassifier(torch.nn.Module):
    """64 -> 128 -> FEATURES -> 10 MLP; ``features(x)`` is the FEATURES-wide layer."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.SiLU(), torch.nn.Linear(128, FEATURES), torch.nn.SiLU()
        )
        self.head = torch.nn.Linear(FEATURES, 10)

    def features(self, x: Tensor) -> Tensor:
        """x [n, 1, 8, 8] or [n, 64] in [-1, 1] (clipped) -> [n, FEATURES] float32."""
        return self.body(x.reshape(x.shape[0], 64).float().clamp(-1.0, 1.0))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train(steps: int = STEPS, seed: int = SEED) -> DigitsClassifier:
    """The classifier trained on ``train_split``'s training part: full-batch Adam (lr 1e-2, weight
    decay 1e-4), cross-entropy, one thread, fixed seed.  Deterministic; a few seconds on a CPU."""
    x, y, _, _ = train_split()
    with _one_thread(), torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        model = DigitsClassifier()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval().requires_grad_(False)


@functools.cache
def classifier() -> DigitsClassifier:
    """The trained classifier (trained once per process)."""
    return train()


def features(images: Tensor) -> Tensor:
    """Classifier features [n, FEATURES] of images [n, 1, 8, 8] or [n, 64] in [-1, 1]."""
    with _one_thread(), torch.no_grad():
        return classifier().features(images.detach().to("cpu"))


def fd(images: Tensor, reference: Tensor) -> float:
    """Fréchet distance between the classifier features of two image sets."""
    return frechet_distance(features(images), features(reference))


def accuracy(model: DigitsClassifier, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()
