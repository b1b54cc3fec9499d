"""Samplers of score-based models, one a file, sharing the step contract of ``base``."""

from __future__ import annotations

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
        adaptive_sde,
    )
}


def get(name: str) -> ModuleType:
    if name not in SAMPLERS:
        raise ValueError(f"sampler: unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def draws_per_step(module: ModuleType, options: dict) -> int:
    """S of the allocation table for this sampler and its options."""
    return module.DRAWS(**options) if callable(module.DRAWS) else module.DRAWS
