"""pc's default corrector step is batch-invariant and right for the data's dimension (issue 18, items 18-19).

``scorefast sample --batch 64`` and ``--batch 32`` promise equal samples; the CLI's default pc used
batch-mean corrector norms on low-D data (score_sde's), which tie each sample's step to its batch.
The default ``norm="auto"`` is the fixed step from the SDE (``"expected"``) below 256 elements per
sample and per-sample norms from there: both batch-invariant.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import scorefast as sf
from scorefast.cli import main
from scorefast.samplers import pc
from scorefast.sde import VESDE, VPSDE


def _cli_samples(out, batch: int) -> torch.Tensor:
    args = ["sample", "--model", "gmm2d", "--steps", "30", "--n", "96", "--batch", str(batch)]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    return load_file(str(out / "samples.safetensors"))["samples"]


def test_cli_default_sampler_gives_the_same_samples_for_any_batch(tmp_path):
    """Before: pc with norm="batch" on gmm2d, so --batch 64 and --batch 32 gave different samples."""
    assert torch.equal(_cli_samples(tmp_path / "a", 64), _cli_samples(tmp_path / "b", 32))


@pytest.mark.parametrize("D,expected", [(2, "expected"), (255, "expected"), (256, "sample"), (3 * 16 * 16, "sample")])
def test_auto_norm_by_dimension(D, expected):
    assert pc.resolved_norm("auto", torch.zeros(1, D)) == expected
    sde = VESDE(0.01, 10)

    def score(x, t):
        return -x / (1.0 + t[:, None] ** 2)

    auto = sf.sample(score, sde, (3, D), sampler="pc", steps=4, seed=1)
    assert torch.equal(auto, sf.sample(score, sde, (3, D), sampler="pc", steps=4, seed=1, norm=expected))


@pytest.mark.parametrize("D", [2, 300])
def test_pc_default_is_batch_invariant_bitwise(D):
    sde = VPSDE()

    def score(x, t):
        return -x / (1.0 + t[:, None] ** 2)

    big = sf.sample(score, sde, (64, D), sampler="pc", steps=6, seed=3)
    ids = [40, 3, 17]
    small = sf.sample(score, sde, (3, D), sampler="pc", steps=6, seed=3, sample_ids=torch.tensor(ids))
    assert torch.equal(small, big[ids])
    batch = sf.sample(score, sde, (3, D), sampler="pc", steps=6, seed=3, sample_ids=torch.tensor(ids), norm="batch")
    assert not torch.equal(batch, big[ids])  # score_sde's batch means stay available, and are not invariant
