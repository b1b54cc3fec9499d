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

# 64: launch-bound, the per-step overhead of each loop shows; 4096: the network's matmuls dominate
BATCHES = [512] if QUICK else [64, 4096]
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


def _group(model, B):
    if (model, B) not in _cache:
        _cache[model, B] = _samplers.cases(model, B, BUDGET)
    return _cache[model, B]


@pytest.mark.parametrize("role", ["eager", "fused"])
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("model", ["gmm2d", "mlp"])
@pytest.mark.parametrize("B", BATCHES)
def test_sampler(record, B, model, sampler, role):
    target, cases = _group(model, B)
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
        group=f"{sampler}-{model}-{B}",
        role=role,
        rounds=5,
        nfe=nfe,
        peer=peer,
        model=model,
        **extra,
    )
