"""Bad input gets a ValueError/TypeError that names the argument."""

from __future__ import annotations

import math

import pytest
import torch

import scorefast as sf

x = torch.zeros(3, 4)
s = torch.ones(3, 4)


@pytest.mark.parametrize(
    "call,exc,name",
    [
        (lambda: sf.ops.fused_update(x, [(1.0, torch.ones(3, 5))]), ValueError, "terms\\[0\\]"),
        (lambda: sf.ops.fused_update(x, [(1.0, torch.ones(2, 4))]), ValueError, "terms\\[0\\]"),
        (lambda: sf.ops.fused_update(torch.zeros(3, 4, dtype=torch.int32), []), TypeError, "x"),
        (lambda: sf.ops.fused_update(x, [(1.0, torch.ones(3, 4, dtype=torch.int64))]), TypeError, "terms\\[0\\]"),
        (lambda: sf.ops.fused_update(x, [(1.0, torch.ones(3, 4, device="meta"))]), ValueError, "terms\\[0\\]"),
        (lambda: sf.ops.fused_update(torch.tensor(1.0), []), ValueError, "x"),
        (lambda: sf.ops.fused_update(x, [s]), TypeError, "terms\\[0\\]"),
        (lambda: sf.ops.fused_update(x, [(math.nan, s)]), ValueError, "coefficient"),
        (lambda: sf.ops.fused_update(x, [(torch.ones(4), s)]), ValueError, "coefficient"),
        (lambda: sf.ops.fused_update(x, [], noise=math.inf), ValueError, "noise"),
        (lambda: sf.ops.fused_update(x, [], x_coef=torch.tensor([1.0, math.nan, 1.0])), ValueError, "x_coef"),
        (lambda: sf.ops.fused_update(x, [], out=torch.zeros(3, 5)), ValueError, "out"),
        (lambda: sf.ops.langevin_step(x, s, 0.0, seed=0, step=0), ValueError, "step_size"),
        (lambda: sf.ops.langevin_step(x, s, -1e-3, seed=0, step=0), ValueError, "step_size"),
        (lambda: sf.ops.langevin_step(x, s, math.nan, seed=0, step=0), ValueError, "step_size"),
        (lambda: sf.ops.langevin_step(x, s, torch.tensor([0.1, 0.0, 0.1]), seed=0, step=0), ValueError, "step_size"),
        (lambda: sf.ops.langevin_step(x, s, "0.1", seed=0, step=0), TypeError, "step_size"),
        (lambda: sf.ops.euler_maruyama_step(x, s, 1.0, 0.0, seed=0, step=0), ValueError, "dt"),
        (lambda: sf.ops.euler_maruyama_step(x, s, 1.0, math.inf, seed=0, step=0), ValueError, "dt"),
        (lambda: sf.ops.euler_maruyama_step(x, s, math.nan, 0.1, seed=0, step=0), ValueError, "diffusion"),
        (lambda: sf.ops.snr_langevin_step(x, s, 0.16, norm="layer", seed=0, step=0), ValueError, "norm"),
        (lambda: sf.ops.snr_langevin_step(x, s, -0.16, seed=0, step=0), ValueError, "snr"),
        (lambda: sf.ops.snr_langevin_step(x, torch.ones(3, 2), 0.16, seed=0, step=0), ValueError, "score"),
        (lambda: sf.randn((3, 4), seed=0, sample_ids=torch.arange(2)), ValueError, "sample_ids"),
        (lambda: sf.randn((3, 4), seed=0, sample_ids=torch.tensor([0, 1, 2**32])), ValueError, "sample_ids"),
        (lambda: sf.randn((3, 4), seed=0, sample_ids=torch.tensor([0, -1, 2])), ValueError, "sample_ids"),
        (lambda: sf.randn((3, 4), seed=0, sample_ids=torch.zeros(3)), TypeError, "sample_ids"),
        (lambda: sf.randn((3, 4), seed=-1), ValueError, "seed"),
        (lambda: sf.randn((3, 4), seed=2**64), ValueError, "seed"),
        (lambda: sf.randn((3, 4), seed=1.5), TypeError, "seed"),
        (lambda: sf.randn((3, 4), seed=torch.tensor(1, dtype=torch.int32)), TypeError, "seed"),
        (lambda: sf.randn((3, 4), seed=0, step=2**32), ValueError, "step"),
        (lambda: sf.randn((3, 4), seed=0, step=-1), ValueError, "step"),
        (lambda: sf.randn((3, 4), seed=0, step=torch.tensor(2**32)), ValueError, "step"),
        (lambda: sf.randn((3, 4), seed=0, stream=-2), ValueError, "stream"),
        (lambda: sf.randn((), seed=0), ValueError, "shape"),
        (lambda: sf.randn((3, 4), seed=0, dtype=torch.int64), TypeError, "dtype"),
        (lambda: sf.ops.noise((3, 4), kind="cauchy", seed=0), ValueError, "kind"),
        (lambda: sf.randn((3, 4), seed=0, backend="opencl"), ValueError, "backend"),
    ],
)
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


def test_forced_backend_that_cannot_run_is_an_error_not_a_fallback(monkeypatch):
    with pytest.raises(sf.BackendUnavailableError, match="cuda"):
        sf.randn((2, 3), seed=0, backend="cuda")
    monkeypatch.setenv("SCOREFAST_BACKEND", "cuda")
    with pytest.raises(sf.BackendUnavailableError, match="cuda"):
        sf.randn((2, 3), seed=0)
