"""Global gradient-norm clipping for ``TrainStep``: ``torch.nn.utils.clip_grad_norm_``'s rule,
grads <- grads * min(1, max_norm / (total + 1e-6)) with total the 2-norm of all gradients.

``clip_grad_norm_ref`` is the readable reference (per-tensor norms with ``torch._foreach_norm``,
the norm of their stack, one ``torch._foreach_mul_`` per group: clip_grad_norm_'s own arithmetic,
and its form on GPUs).  On the ``cpu`` backend one float32 group is clipped by one C++ call
(``csrc/cpu/train_impl.h``): the sums of squares in float64, so the total can differ from the
reference's float32 reductions in its last bits, and the gradients by the one ulp that follows from
the coefficient; where it does not, they are the same bits.  Past float32's range the two part: a
norm above ~1.8e19 overflows the reference's float32 sums (an infinite total, so it zeroes the
gradients), while the kernel's float64 sums give the finite total and scale them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, backends


def clip_grad_norm_ref(groups: list[list[Tensor]], max_norm: float) -> Tensor:
    """Clip the gradients of ``groups`` (lists of tensors of one device and dtype) in place; returns
    the total norm (0-d, on the first group's device)."""
    if not groups:
        return torch.zeros(())
    first = groups[0][0].device
    if len(groups) == 1:  # one device and dtype: the norms are where the total is taken
        norms = torch._foreach_norm(groups[0])
    else:
        norms = [n if n.device == first else n.to(first) for g in groups for n in torch._foreach_norm(g)]
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.reciprocal(total + 1e-6).mul_(max_norm).clamp_(max=1.0)  # max_norm / (total + 1e-6)
    for grads in groups:
        torch._foreach_mul_(grads, coef if grads[0].device == first else coef.to(grads[0].device))
    return total


def _one_cpu_call(groups: list[list[Tensor]], backend: str) -> bool:
    """The C++ kernel's case: the cpu backend, one group of contiguous float32 CPU tensors."""
    if backend != "cpu" or len(groups) != 1:
        return False
    grads = groups[0]
    return grads[0].device.type == "cpu" and grads[0].dtype == torch.float32 and all(g.is_contiguous() for g in grads)


def _kernel():
    """The cpu backend's C++ clip, or None (a build older than it)."""
    return backends.get("cpu").kernel("clip_grad_norm")


@torch.library.custom_op("scorefast::clip_grad_norm_cpu_", mutates_args=("grads",))
def clip_grad_norm_cpu_op(grads: list[Tensor], max_norm: float) -> Tensor:
    """The C++ clip as a dispatched op (what a trace or the capture stand-in records)."""
    return _kernel()(grads, max_norm)


@clip_grad_norm_cpu_op.register_fake
def _(grads, max_norm):
    return grads[0].new_empty((), dtype=torch.float32)


def clip_grad_norm(groups: list[list[Tensor]], max_norm: float, backend: str) -> Tensor:
    """``clip_grad_norm_ref`` by the backend's kernel where it has one (module docstring)."""
    kernel = _kernel() if _one_cpu_call(groups, backend) else None
    if kernel is None:
        return clip_grad_norm_ref(groups, max_norm)
    if _checks.use_custom_op(*groups[0]):
        return clip_grad_norm_cpu_op(groups[0], float(max_norm))
    return kernel(groups[0], float(max_norm))
