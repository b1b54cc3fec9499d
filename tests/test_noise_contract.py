"""Every backend reproduces shared/testdata/noise_contract.json: words exactly, normals within 1e-5."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import scorefast as sf
from scorefast import rng
from tests.conftest import backend_params


def _golden_path() -> Path:
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "shared" / "testdata" / "noise_contract.json"
        if candidate.exists():
            return candidate
    candidate = here.parents[1] / "tests" / "data" / "noise_contract.json"
    return candidate


GOLDEN = json.loads(_golden_path().read_text())
KAT = GOLDEN["philox4x32_10_kat"]
CONTRACT = GOLDEN["contract"]


def _hex(values):
    return [int(v, 16) for v in values]


@pytest.mark.parametrize("kat", KAT, ids=lambda k: "-".join(k["counter"][:1] + k["key"][:1]))
def test_philox_known_answers_reference(kat):
    out = rng.philox4x32_10(*_hex(kat["counter"]), *_hex(kat["key"]))
    assert [int(w) for w in out] == _hex(kat["out"])


@pytest.mark.parametrize("module", ["_C_default", "_C_avx2", "_C_avx512", "_cuda", "_cuda_host"])
@pytest.mark.parametrize("kat", KAT, ids=lambda k: "-".join(k["counter"][:1] + k["key"][:1]))
def test_philox_known_answers_compiled_header(module, kat):
    """The shared C++/CUDA header (host side of the CUDA module too) gives Random123's answers."""
    import importlib

    from scorefast.backends.cpu_backend import runnable_isas

    if module.startswith("_C_") and module[3:] not in runnable_isas():
        pytest.skip(f"this CPU cannot run the {module[3:]} build (capability {runnable_isas()[0]})")
    try:
        m = importlib.import_module(f"scorefast.{module}")
    except ImportError as err:
        pytest.skip(f"scorefast.{module} not built: {err}")
    assert m.philox_words(*_hex(kat["counter"]), *_hex(kat["key"])) == _hex(kat["out"])


def _group_by_draw():
    groups = {}
    for row in CONTRACT:
        groups.setdefault((row["seed"], row["step"], row["stream"], row["sample_id"]), []).append(row)
    return groups


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", ["normal", "uniform", "rademacher"])
def test_contract_values(backend, kind):
    for (seed, step, stream, sample_id), rows in _group_by_draw().items():
        D = max(r["element"] for r in rows) + 1
        ids = torch.tensor([sample_id])
        got = sf.ops.noise((1, D), kind=kind, seed=seed, step=step, stream=stream, sample_ids=ids, backend=backend)[0]
        for r in rows:
            e = r["element"]
            if kind == "normal":
                assert abs(float(got[e]) - r["normal"]) <= 1e-5, (backend, r)
            elif kind == "uniform":
                assert float(got[e]) == r["uniform"], (backend, r)  # the fp32 uniform is exact
            else:
                assert float(got[e]) == r["rademacher"], (backend, r)


def test_reference_words_match_contract():
    for (seed, step, stream, sample_id), rows in _group_by_draw().items():
        e = torch.tensor([r["element"] for r in rows])
        words = rng.words_ref(seed, step, torch.tensor([sample_id]), stream, e)[0]
        assert [int(w) for w in words] == [r["word"] for r in rows]


def test_contract_covers_edge_counters():
    """The golden table exercises a seed with a nonzero high key word, large steps/ids, several streams."""
    assert max(r["seed"] for r in CONTRACT) >> 32 > 0
    assert max(r["step"] for r in CONTRACT) >= 1 << 31
    assert max(r["sample_id"] for r in CONTRACT) == (1 << 32) - 1
    assert len({r["stream"] for r in CONTRACT}) >= 3


@pytest.mark.parametrize("backend", backend_params())
def test_seeds_above_two_to_the_63(backend):
    """A seed in [2**63, 2**64) keys Philox with uint64(seed) on every backend (beyond the golden table)."""
    for seed in (1 << 63, (1 << 64) - 1, 0xFEDCBA9876543210):
        got = sf.randn((2, 9), seed=seed, step=3, sample_ids=torch.tensor([0, 2**32 - 1]), backend=backend)
        words = rng.words_ref(seed, 3, torch.tensor([0, 2**32 - 1]), 0, torch.arange(9))
        k0, k1 = seed & 0xFFFFFFFF, seed >> 32
        direct = rng.philox4x32_10(0, 3, 2**32 - 1, 0, k0, k1)
        assert int(words[1, 0]) == int(direct[0])
        ref = rng.noise_ref("normal", seed, 3, torch.tensor([0, 2**32 - 1]), 0, 9)
        assert (got.double() - ref).abs().max() <= 1e-5
