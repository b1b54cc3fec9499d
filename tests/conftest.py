"""Shared fixtures: the backends that run CPU tensors in this process, CUDA skipping."""

from __future__ import annotations

import os

import pytest
import torch

import scorefast as sf

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def backend_params(include_torch: bool = True):
    """pytest params for every backend that can run CPU tensors here (triton: interpreter only)."""
    names = (["torch"] if include_torch else []) + ["cpu", "triton"]
    params = []
    for name in names:
        st = sf.backends.state(name)
        ok = st.available and "cpu" in st.devices
        why = st.why if not st.available else f"{name} does not run CPU tensors in this process"
        if name == "triton" and not INTERPRETED:
            why = "triton runs in the TRITON_INTERPRET=1 subprocess (test_triton_interpreted)"
        params.append(pytest.param(name, id=name, marks=() if ok else pytest.mark.skip(reason=why)))
    return params


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv("SCOREFAST_BACKEND", raising=False)
