"""CPU end-to-end: each sampler at a fixed NFE budget vs the peer's eager loop, same run.

Rows carry nfe, time per NFE and (2-D mixture with its exact score) the sliced-Wasserstein distance
to exact samples, with the exact-vs-exact Monte-Carlo floor beside it.
"""

from __future__ import annotations

import pytest
import torch

from bench import _samplers
from bench.conftest import QUICK
from scorefast.testing import sliced_wasserstein

B = 512 if QUICK else 4096
BUDGET = 64 if QUICK else 200
SAMPLERS = [
    "pc",
    "euler_maruyama",
    "reverse_diffusion",
    "heun",
    "dpm_solver++",
    "ancestral",
    "ddim",
    "ode_euler",
    "rk45",
    "annealed_langevin",
    "langevin",
]
_cache: dict = {}


def _group(model):
    if model not in _cache:
        _cache[model] = _samplers.cases(model, B, BUDGET)
    return _cache[model]


@pytest.mark.parametrize("role", ["eager", "fused"])
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("model", ["gmm2d", "mlp"])
def test_sampler(record, model, sampler, role):
    target, cases = _group(model)
    if role not in cases[sampler]:
        pytest.skip(f"no {role} loop for {sampler}")
    name, fn, nfe, peer = cases[sampler][role]
    extra = {}
    if model == "gmm2d":
        samples = fn()
        exact = target.sample(B, seed=1).float()
        extra["sliced_wasserstein"] = sliced_wasserstein(samples.float(), exact)
        extra["sw_floor"] = sliced_wasserstein(target.sample(B, seed=2).float(), exact)
    record(
        fn,
        name=name,
        backend="torch" if role == "eager" else "cpu",
        dtype=torch.float32,
        size=B,
        group=f"{sampler}-{model}",
        role=role,
        rounds=3,
        nfe=nfe,
        peer=peer,
        model=model,
        **extra,
    )
