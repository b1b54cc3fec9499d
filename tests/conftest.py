"""Shared fixtures: the backends that run CPU tensors in this process, CUDA skipping."""

from __future__ import annotations

import os

import pytest
import torch

import scorefast as sf

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CUDA_EMULATED = os.environ.get("SCOREFAST_CUDA_EMULATE") == "1"


def backend_params(include_torch: bool = True):
    """pytest params for every backend that can run CPU tensors here.

    triton runs them under its interpreter (``test_triton_interpreted``), cuda under the host
    emulation of its kernels (``test_cuda_kernels_emulated``), each in a subprocess of its own.
    """
    names = (["torch"] if include_torch else []) + ["cpu", "triton", "cuda"]
    params = []
    for name in names:
        st = sf.backends.state(name)
        ok = st.available and "cpu" in st.devices
        why = st.why if not st.available else f"{name} does not run CPU tensors in this process"
        marks = []
        if name == "triton" and not INTERPRETED:
            why = "triton runs in the TRITON_INTERPRET=1 subprocess (test_triton_interpreted)"
        if name == "cuda":
            marks.append(pytest.mark.cuda_emulated)
            if not CUDA_EMULATED:
                why = "cuda runs CPU tensors in the SCOREFAST_CUDA_EMULATE=1 subprocess (test_cuda_kernels_emulated)"
        if not ok:
            marks.append(pytest.mark.skip(reason=why))
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:  # the marker, not a "cuda" parameter id
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv("SCOREFAST_BACKEND", raising=False)
