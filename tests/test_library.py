"""torch.library registration: opcheck on every custom op, torch.compile(fullgraph=True) on CPU."""

from __future__ import annotations

import pytest
import torch

import scorefast as sf
from scorefast.ops.fused_update import fused_update_op, fused_update_out_op
from scorefast.ops.noise import noise_op, noise_out_op
from scorefast.ops.sample_norm import sumsq_norms_op
from tests.conftest import INTERPRETED, backend_params

BACKENDS = backend_params()


def _counter():
    return torch.tensor(7), torch.tensor(3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_fused_update(backend):
    seed, step = _counter()
    ids = torch.arange(3)
    x = torch.randn(3, 10, requires_grad=True)
    s = torch.randn(3, 10, requires_grad=True)
    coefs = torch.rand(3, 3, requires_grad=True)
    torch.library.opcheck(fused_update_op, (x, [s], coefs, seed, step, 0, ids, True, backend))
    column = torch.rand(3, 1, requires_grad=True)  # coefficients shared by the batch
    torch.library.opcheck(fused_update_op, (x, [s], column, seed, step, 0, ids, True, backend))
    out = torch.empty(3, 10)
    torch.library.opcheck(
        fused_update_out_op, (out, x.detach(), [s.detach()], coefs.detach(), seed, step, 0, ids, True, backend)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_noise_and_norms(backend):
    seed, step = _counter()
    ids = torch.arange(4)
    torch.library.opcheck(noise_op, (ids, seed, step, 9, 0, 2, 1, torch.float32, backend))
    torch.library.opcheck(noise_out_op, (torch.empty(4, 9), ids, seed, step, 0, 0, 1, backend))
    t = torch.randn(4, 9, requires_grad=True)
    torch.library.opcheck(sumsq_norms_op, (t, ids, seed, step, 9, 0, True, torch.float32, backend))


@pytest.mark.skipif(INTERPRETED, reason="compile runs the compiled CPU path")
@pytest.mark.parametrize("backend", backend_params(include_torch=False))
def test_torch_compile_fullgraph(backend):
    def sampler_step(x, s, eps, step):
        x = sf.ops.langevin_step(x, s, eps, seed=3, step=step, backend=backend)
        x, e = sf.ops.snr_langevin_step(x, -x, 0.16, seed=3, step=step, stream=0, backend=backend)
        return sf.ops.euler_maruyama_step(x, -0.5 * x, 1.0, -0.01, seed=4, step=step, backend=backend), e

    x, s = torch.randn(4, 33), torch.randn(4, 33)
    eps = torch.full((4,), 0.01)
    step = torch.tensor(5)
    compiled = torch.compile(sampler_step, fullgraph=True)
    got = compiled(x, s, eps, step)
    ref = sampler_step(x, s, eps, step)
    # inductor may refuse the [B]-sized step-size arithmetic around the ops: fp32 rounding, not bits
    torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], ref[1], atol=0, rtol=1e-6)
    step.fill_(6)  # the counter is a tensor: a new value changes the noise without recompiling
    assert not torch.equal(compiled(x, s, eps, step)[0], got[0])
