"""The step contract every sampler shares (one sampler a file, torchsde-style).

A sampler module defines ``NAME``, ``DRAWS`` (S: noise draws per step, so draw j of step n uses
Philox step k = n*S + j on stream 0 — no two draws of a run share a counter), ``DEFAULT_STEPS``,
``KIND`` ("sde" steps from each of the N grid times; "ode" integrates the N-1 intervals and ends
with a Tweedie step), and ``run(ctx, x, **options) -> x``.  Samplers are plain PyTorch calling
``scorefast.ops``, so one sampler runs on every backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..backends import resolve
from ..errors import NonFiniteError
from ..ops.fused_update import apply
from ..rng import STREAM_SAMPLER
from ..sde.base import as_time

CHECK_EVERY = 50  # read the non-finite flag on the host every K steps when not capturing


@dataclass
class Context:
    """What a sampler needs: the wrapped score, the SDE, the grid and the noise counter."""

    score_fn: Callable
    sde: object
    times: Tensor  # float64 [N] grid, decreasing
    seed: int | Tensor
    sample_ids: Tensor
    draws: int
    backend: str | None = None
    extra_args: dict = field(default_factory=dict)
    callback: Callable | None = None
    autocast_dtype: torch.dtype | None = None
    score_sde_tables: bool = False
    nfe: int = 0
    per_sample_nfe: Tensor | None = None  # adaptive solvers
    project: Callable | None = None  # conditional wrappers: project(ctx, x, n, t) -> x after step n
    _backend_name: str | None = None
    _first_bad: Tensor | None = None
    _bad_time: Tensor | None = None
    _step: int = 0
    _progress: object = None

    # -- score evaluations ----------------------------------------------------------------
    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        """score_fn(x, t [B] in the SDE's time, **extra_args) in x's dtype; counts NFE, flags NaN/inf."""
        t = (
            torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
            if isinstance(t, float)
            else as_time(t, x)
        )
        if self.autocast_dtype is not None:
            with torch.autocast(x.device.type, dtype=self.autocast_dtype):
                s = self.score_fn(x, t.to(x.dtype), **self.extra_args)
        else:
            s = self.score_fn(x, t.to(x.dtype), **self.extra_args)
        if not isinstance(s, Tensor) or s.shape != x.shape:
            shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(f"score_fn: returned {shape}, expected a tensor shaped like x {tuple(x.shape)}")
        self.nfe += 1
        bad = ~torch.isfinite(s).all()
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.int64, device=x.device)
            self._bad_time = torch.zeros((), dtype=torch.float64, device=x.device)
        fresh = bad & (self._first_bad < 0)
        self._first_bad = torch.where(fresh, torch.full_like(self._first_bad, self._step), self._first_bad)
        self._bad_time = torch.where(fresh, t[0], self._bad_time)
        return s.to(x.dtype) if s.dtype != x.dtype else s

    def denoised(self, x: Tensor, t: float, score: Tensor) -> Tensor:
        """Tweedie: x0 = (x + std(t)^2 s) / mean_coef(t), one fused pass (t one time for the batch)."""
        tt = torch.tensor([t], dtype=torch.float64)
        a, s = float(self.sde.mean_coef(tt)), float(self.sde.std(tt))
        return self.update(x, [(s * s / a, score)], x_coef=1.0 / a)

    def schedule_times(self) -> tuple[Tensor, Tensor]:
        """(t_n, t_{n+1}) float64 [N] on the host, t_N = 0 (the data end): for per-run coefficient tables."""
        times = self.times.to("cpu", torch.float64)
        return times, torch.cat([times[1:], times.new_zeros(1)])

    # -- noise ----------------------------------------------------------------------------
    def counter(self, n: int, j: int = 0) -> int:
        """Philox step of draw j of step n: n*S + j."""
        if not 0 <= j < self.draws:
            raise AssertionError(f"draw {j} outside the {self.draws} declared draws")
        return n * self.draws + j

    def update(self, x: Tensor, terms, *, noise=0.0, n: int = 0, j: int = 0, x_coef=1.0) -> Tensor:
        """fused_update on stream 0 with step n*S + j (arguments were validated once per run)."""
        return apply(
            x,
            terms,
            noise=noise,
            x_coef=x_coef,
            seed=self.seed,
            step=self.counter(n, j),
            stream=STREAM_SAMPLER,
            sample_ids=self.sample_ids,
            out=None,
            backend=self.backend_name(x),
            trusted=True,
        )

    def backend_name(self, x: Tensor) -> str:
        """The resolved backend for the state's device and dtype (resolved once)."""
        if self._backend_name is None:
            self._backend_name = resolve(self.backend, x.device, x.dtype)
        return self._backend_name

    # -- bookkeeping ----------------------------------------------------------------------
    def step_done(self, n: int, x: Tensor, t, denoised: Tensor | None = None) -> Tensor:
        """After step n (taken from time t): the conditional projection, callback, progress, checks."""
        if self.project is not None:
            x = self.project(self, x, n, t)
        self._step = n + 1
        if self.callback is not None:
            if not isinstance(t, Tensor):
                t = torch.full((x.shape[0],), float(t), dtype=torch.float64, device=x.device)
            self.callback({"x": x, "i": n, "t": t, "sigma": t, "denoised": denoised})
        if self._progress is not None:
            self._progress.update(1)
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if not capturing and (n + 1) % CHECK_EVERY == 0:
            self.check_finite()
        return x

    def check_finite(self) -> None:
        if self._first_bad is not None and int(self._first_bad) >= 0:
            raise NonFiniteError(
                f"score_fn returned non-finite values at step {int(self._first_bad)} (t = {float(self._bad_time):.6g})"
            )

    def t_vec(self, t: float | Tensor, x: Tensor) -> Tensor:
        return as_time(t, x)
