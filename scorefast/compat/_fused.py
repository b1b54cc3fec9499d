"""One fused update for the compat layers, validated cheaply: the backend and the default sample ids
are resolved once per (batch, device, dtype), coefficients are the layers' own finite floats, and
only the tensors' shapes are checked per call (the full public checks cost more than the update
itself on small CPU rows)."""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from .. import _checks
from ..backends import resolve
from ..ops.fused_update import apply
from ..rng import STREAM_SAMPLER


def _coef(c, x: Tensor) -> float | Tensor:
    """A finite float, or a per-sample [B] / 0-d float tensor on x's device (scheduler tables)."""
    if isinstance(c, Tensor):
        if c.dim() > 1 or (c.dim() == 1 and c.shape[0] != x.shape[0]) or c.device != x.device:
            raise ValueError(f"coefficient: expected a scalar or [B] tensor on {x.device}, got {tuple(c.shape)}")
        return c.to(_checks.state_dtype(x))  # float64 coefficients for a float64 state, as Python numbers get
    c = float(c)
    if not math.isfinite(c):
        raise ValueError(f"coefficient {c} is not finite (check the sigmas / timesteps)")
    return c


class FusedUpdater:
    """``x_coef x + sum c t + noise z`` on stream 0, z the Philox normals of (seed, step, ids arange(B))."""

    def __init__(self):
        self._cache: dict[tuple, tuple[str, Tensor]] = {}

    def _resolved(self, x: Tensor) -> tuple[str, Tensor]:
        key = (x.shape[0], x.device, x.dtype)
        if key not in self._cache:
            _checks.check_float_tensor("x", x)
            ids = _checks.check_sample_ids(None, x.shape[0], x.device)
            self._cache[key] = (resolve(None, x.device, x.dtype), ids)
        return self._cache[key]

    def __call__(self, x: Tensor, terms, *, x_coef: float = 1.0, noise: float = 0.0, seed: int = 0, step: int = 0):
        backend, ids = self._resolved(x)
        checked = []
        for c, t in terms:
            if t.shape != x.shape:
                raise ValueError(f"model output / noise: shape {tuple(t.shape)} does not match x {tuple(x.shape)}")
            checked.append((_coef(c, x), t))
        seed = seed - (1 << 64) if seed >= 1 << 63 else seed  # the ops take the int64 two's complement
        return apply(
            x,
            checked,
            noise=_coef(noise, x),
            seed=seed,
            step=step,
            stream=STREAM_SAMPLER,
            sample_ids=ids,
            x_coef=_coef(x_coef, x),
            out=None,
            backend=backend,
            trusted=True,
        )


class RowsUpdater(FusedUpdater):
    """A ``FusedUpdater`` whose rows are the samples ``ids`` of a larger batch (a batch that sheds its
    finished samples): row r's noise is sample ids[r]'s, as it would be in the whole batch.  Assign
    ``ids`` (int64 [rows], checked here) whenever the rows change."""

    def __init__(self, ids: Tensor):
        super().__init__()
        self.ids = ids

    @property
    def ids(self) -> Tensor:
        return self._ids

    @ids.setter
    def ids(self, ids: Tensor) -> None:
        self._ids = _checks.check_sample_ids(ids, ids.shape[0], ids.device)

    def _resolved(self, x: Tensor) -> tuple[str, Tensor]:
        backend, _ = super()._resolved(x)
        if self._ids.shape[0] != x.shape[0] or self._ids.device != x.device:
            raise ValueError(
                f"x: {x.shape[0]} rows on {x.device} for {self._ids.shape[0]} sample ids on {self._ids.device}"
            )
        return backend, self._ids


def lagrange_integral(nodes: list[float], j: int, a: float, b: float) -> float:
    """int_a^b of the Lagrange basis polynomial l_j over ``nodes`` (float64, exact up to rounding).

    The linear multistep weight of node j (k-diffusion's and diffusers' LMS integrate it with
    ``scipy.integrate.quad``)."""
    poly = np.polynomial.Polynomial([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-node, 1.0]) / (nodes[j] - node)
    integral = poly.integ()
    return float(integral(b) - integral(a))
