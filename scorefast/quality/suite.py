"""The grid of the quality suite (``scorefast bench --suite quality``) and its summaries.

Every sampler of ``scorefast.samplers.SAMPLERS`` runs, so samplers added later join by registering:
fixed-step samplers at each NFE budget of ``NFES`` (the most steps whose NFE fits the budget, found
by asking the sampler itself on a one-sample probe), adaptive ones (those with an ``rtol`` option)
at each tolerance of ``TOLERANCES``, reporting the NFE they took.  ``report.summary`` reads a
results file back: the least NFE whose quality is within ``QUALITY_FACTOR`` of the floor, and the
wall time of that run (time-to-quality).
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import samplers as _samplers
from .. import sde as _sde
from ..sampling import sample

NFES = (5, 10, 20, 50, 100, 200)
TOLERANCES = (1e-1, 1e-2, 1e-3, 1e-4)
QUALITY_FACTOR = 1.1
SEED = 0  # every run starts from the same prior draw (score_sde's loops draw x_T with seed 0)
# options the suite passes to samplers whose defaults do not fit it: score_sde's batch-norm corrector
# (per-sample SNR norms are meant for images, not 2-D points), a few Langevin steps per noise level
SUITE_OPTIONS: dict[str, dict] = {"pc": {"norm": "batch"}, "annealed_langevin": {"n_steps_each": 5}}


def sdes() -> dict[str, Callable[[], object]]:
    """The SDEs of the exact targets; RectifiedFlow joins when ``scorefast.sde`` has it."""
    out = {"vp": _sde.VPSDE, "ve": _sde.VESDE, "edm": _sde.EDM}
    if hasattr(_sde, "RectifiedFlow"):
        out["rf"] = _sde.RectifiedFlow
    return out


def is_adaptive(name: str) -> bool:
    """A sampler that chooses its own steps (it takes ``rtol``): runs at tolerances, not at NFE budgets."""
    return "rtol" in inspect.signature(_samplers.get(name).run).parameters


def options(name: str) -> dict:
    return dict(SUITE_OPTIONS.get(name, {}))


@functools.cache
def _probe_nfe(name: str, sde_key: str, steps: int, opts: tuple) -> int:
    """NFE of one run of ``name`` at ``steps`` on a one-sample, one-feature probe with a zero score
    (finite for every sampler and step size: the NFE, not the samples, is wanted)."""
    _, info = sample(
        lambda x, t, **_: torch.zeros_like(x),
        sdes()[sde_key](),
        (1, 1),
        sampler=name,
        steps=steps,
        return_info=True,
        **dict(opts),
    )
    return int(info["nfe"])


def steps_for_nfe(name: str, nfe: int, sde_key: str = "ve", opts: dict | None = None) -> int | None:
    """The most steps whose NFE is <= nfe (None if even the fewest steps cost more).

    NFE is affine in steps for every fixed-step sampler (N, 2N - 1, N (1 + correctors), L n_each):
    read off two probe runs, then checked on a third."""
    key = tuple(sorted((opts or {}).items()))
    lo = 2  # ODE samplers need 2 grid times
    a, b = _probe_nfe(name, sde_key, lo, key), _probe_nfe(name, sde_key, lo + 1, key)
    slope = b - a
    if slope <= 0:
        raise ValueError(f"sampler: {name!r} does not spend NFE per step (probe: {a}, {b})")
    if nfe < a:
        return 1 if _probe_nfe(name, sde_key, 1, key) <= nfe and _samplers.get(name).KIND != "ode" else None
    steps = lo + (nfe - a) // slope
    if _probe_nfe(name, sde_key, steps, key) > nfe:
        raise AssertionError(f"{name}: NFE not affine in steps")
    return steps


@dataclass
class Run:
    """One sampler run: samples [n, ...] (float64), the NFE it took and its wall / CPU time."""

    samples: Tensor
    nfe: int
    wall_s: float
    cpu_s: float
    extra: dict


def timed(fn: Callable[[], tuple[Tensor, int, dict]]) -> Run:
    """Run fn() -> (samples, nfe, extra) once, timing it (wall clock and this process's CPU time)."""
    start, cpu = time.perf_counter(), time.process_time()
    x, nfe, extra = fn()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return Run(x.detach().to("cpu", torch.float64), int(nfe), wall, cpu, extra)


def run_ours(
    name: str,
    score_fn,
    sde,
    shape,
    *,
    nfe: int | None = None,
    tol: float | None = None,
    schedule=None,
    opts: dict | None = None,
) -> Run | None:
    """``sf.sample`` of sampler ``name`` at an NFE budget (fixed-step) or a tolerance (adaptive)."""
    opts = {**options(name), **(opts or {})}
    if tol is not None:
        opts.update(rtol=tol, atol=tol)
        steps = None
    else:
        sde_key = next((k for k, f in sdes().items() if isinstance(sde, f)), "ve")
        steps = steps_for_nfe(name, nfe, sde_key, opts)
        if steps is None:
            return None

    def go():
        with torch.no_grad():
            x, info = sample(
                score_fn, sde, shape, sampler=name, steps=steps, seed=SEED, schedule=schedule, return_info=True, **opts
            )
        extra = {"steps": steps}
        if "nfe_per_sample" in info:
            extra["nfe_mean"] = float(info["nfe_per_sample"].double().mean())
        return x, info["nfe"], extra

    return timed(go)
