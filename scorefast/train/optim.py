"""The optimizer step on the implementation torch leaves open: foreach for a CPU Adam / AdamW.

``torch.optim.Adam(params)`` leaves its implementation to torch (``foreach=None, fused=None``): torch
takes its multi-tensor (foreach) form on CUDA and the per-parameter Python loop elsewhere.  On the CPU
both forms run the same ATen kernels in the same order on each tensor (the foreach ops' CPU path loops
over the tensors), so they give the same parameters and optimizer state bit for bit (tested over
Adam / AdamW with weight decay, amsgrad and maximize); the foreach form makes one call per op for all
tensors instead of about ten Python-level calls per parameter (~20% of Adam's time on a 20-tensor
MLP).  ``TrainStep`` therefore takes the foreach form for those groups, for the duration of its
``step()`` only: the group's ``foreach`` reads None again afterwards (its ``state_dict`` is unchanged).
A group whose ``foreach`` or ``fused`` the user set, any tensor hyperparameter (lr, betas, ...: torch's
foreach Adam refuses them unless capturable), ``capturable`` / ``differentiable``, a parameter that
is not a plain CPU tensor, or any other optimizer class keeps torch's own choice.  During the step
the open groups read ``foreach=True`` (a step hook sees it); the bitwise claim is tested against the
installed torch (tests/test_train_optim.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

FOREACH_SAME_BITS = (torch.optim.Adam, torch.optim.AdamW)  # exact classes: a subclass may override step


def open_cpu_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The param groups of a CPU Adam / AdamW whose implementation is left to torch and whose foreach
    form gives the per-parameter loop's numbers (see the module docstring)."""
    if type(optimizer) not in FOREACH_SAME_BITS:
        return []
    groups = []
    for group in optimizer.param_groups:
        if group.get("foreach") is not None or group.get("fused") or group.get("capturable"):
            continue
        if group.get("differentiable") or any(_has_tensor(v) for k, v in group.items() if k != "params"):
            continue
        if all(type(p) in _PLAIN and p.device.type == "cpu" for p in group["params"]):
            groups.append(group)
    return groups


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _has_tensor(value) -> bool:
    """Whether a hyperparameter is or holds a tensor (betas is a tuple)."""
    if isinstance(value, tuple | list):
        return any(isinstance(v, torch.Tensor) for v in value)
    return isinstance(value, torch.Tensor)


@contextlib.contextmanager
def foreach_where_open(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Inside the block, ``open_cpu_groups(optimizer)`` step in torch's foreach form; after it (also on
    error) their ``foreach`` is None again."""
    groups = open_cpu_groups(optimizer)
    for group in groups:
        group["foreach"] = True
    try:
        yield
    finally:
        for group in groups:
            group["foreach"] = None
