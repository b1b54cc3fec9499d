"""``sf.compile``: torch.compile for a score network, leaving CUDA graphs to scorefast."""

from __future__ import annotations

from collections.abc import Callable

import torch

MODES = ("default", "max-autotune-no-cudagraphs")


def compile(score_fn: Callable, *, mode: str = "default", dynamic: bool | None = False, fullgraph: bool = False):
    """``torch.compile(score_fn)`` with a mode that does not capture CUDA graphs of its own.

    Inductor's ``reduce-overhead`` / ``max-autotune`` modes capture graphs themselves; scorefast
    captures whole sampler steps (``sf.sample(cuda_graph=True)``), so those modes are refused.
    ``dynamic=False`` (default) compiles once per batch shape, as samplers keep the batch fixed.
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn: must be callable, got {type(score_fn).__name__}")
    if mode not in MODES:
        raise ValueError(
            f"mode: expected one of {', '.join(MODES)} (CUDA graphs are scorefast's: use sf.sample(cuda_graph=True)), "
            f"got {mode!r}"
        )
    compiled = torch.compile(score_fn, mode=mode, dynamic=dynamic, fullgraph=fullgraph)
    for attr in ("net", "sde", "metadata"):
        if hasattr(score_fn, attr):
            setattr(compiled, attr, getattr(score_fn, attr))
    return compiled
