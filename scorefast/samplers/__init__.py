"""Samplers of score-based models, one a file, sharing the step contract of ``base``."""

from __future__ import annotations

import inspect
from types import ModuleType

from . import (
    adaptive_sde,
    ancestral,
    annealed_langevin,
    ddim,
    dpm_solver_pp,
    euler_maruyama,
    heun,
    langevin,
    ode_euler,
    pc,
    reverse_diffusion,
    rk45,
    unipc,
)

SAMPLERS: dict[str, ModuleType] = {
    m.NAME: m
    for m in (
        langevin,
        annealed_langevin,
        euler_maruyama,
        reverse_diffusion,
        ancestral,
        ddim,
        pc,
        ode_euler,
        heun,
        dpm_solver_pp,
        rk45,
        unipc,
        adaptive_sde,
    )
}


def get(name: str) -> ModuleType:
    if not isinstance(name, str) or name not in SAMPLERS:
        raise ValueError(f"sampler: unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def option_names(module: ModuleType) -> list[str]:
    """The keyword options of ``module.run`` (what ``sf.sample(..., **options)`` may pass)."""
    return [p for p in inspect.signature(module.run).parameters if p not in ("ctx", "x")]


def validate(module: ModuleType, sde, options: dict) -> dict:
    """Every option of the sampler, defaults filled in, checked and normalised (numpy numbers become
    Python ones) before any work: an unknown name is a TypeError, a bad value a ValueError/TypeError
    naming the option.  ``run`` receives the result and trusts it."""
    params = inspect.signature(module.run).parameters
    allowed = option_names(module)
    for key in options:
        if key not in allowed:
            raise TypeError(f"{key}: not an option of sampler {module.NAME!r} (options: {', '.join(allowed)})")
    full = {name: params[name].default for name in allowed} | dict(options)
    return module.validate(sde, **full)


def draws_per_step(module: ModuleType, options: dict) -> int:
    """S of the allocation table for this sampler and its options."""
    return module.DRAWS(**options) if callable(module.DRAWS) else module.DRAWS
