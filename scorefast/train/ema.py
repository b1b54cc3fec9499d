"""Exponential moving average of a model's parameters (and float buffers), multi-tensor updates."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class EMA:
    """shadow <- d * shadow + (1 - d) * live, with d = min(decay, (1 + n) / (1 + n + warmup)) at update n.

    The shadow copy is taken at construction.  Updates use ``torch._foreach_lerp_`` (one multi-tensor
    kernel per dtype/device group).  ``swap()`` puts the shadow weights into the model for the body
    of a ``with`` block and restores the live ones after, also on error.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: int = 0):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not (isinstance(decay, int | float) and 0.0 < decay < 1.0):
            raise ValueError(f"decay: must lie in (0, 1), got {decay!r}")
        if not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup: must be an int >= 0, got {warmup!r}")
        self.model, self.decay, self.warmup = model, float(decay), warmup
        self.num_updates = 0
        self._live = self._tracked()
        self.shadow = [t.detach().clone() for t in self._live]
        self._updates_t: torch.Tensor | None = None  # device-resident update counter (use_device_counter)

    def use_device_counter(self) -> None:
        """Keep the update counter as a 0-d device tensor and compute the decay there, so ``update()``
        reads nothing on the host (CUDA-graph capture); results equal the host path bitwise."""
        if self._updates_t is None and self.shadow:
            self._updates_t = torch.full((), self.num_updates, dtype=torch.int64, device=self.shadow[0].device)

    def _tracked(self) -> list[torch.Tensor]:
        params = [p for p in self.model.parameters()]
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        return params + buffers

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (1 + n + self.warmup)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        live = [t.detach() for t in self._live]
        if self._updates_t is not None:
            n = self._updates_t.to(torch.float64)
            d = torch.clamp((1 + n) / (1 + n + self.warmup), max=self.decay) if self.warmup else n * 0 + self.decay
            weight = 1 - d
            torch._foreach_lerp_(self.shadow, live, [weight.to(t.dtype) for t in self.shadow])
            self._updates_t += 1
        else:
            torch._foreach_lerp_(self.shadow, live, 1.0 - self.current_decay())
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": [t.clone() for t in self.shadow],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"state: {len(state['shadow'])} tensors, the model tracks {len(self.shadow)}")
        self.decay, self.warmup, self.num_updates = state["decay"], state["warmup"], state["num_updates"]
        if self._updates_t is not None:
            self._updates_t.fill_(self.num_updates)
        with torch.no_grad():
            torch._foreach_copy_(self.shadow, [t.to(s.device, s.dtype) for t, s in zip(state["shadow"], self.shadow)])

    @contextlib.contextmanager
    def swap(self) -> Iterator[torch.nn.Module]:
        """Use the EMA weights inside the block; the live weights come back after it."""
        live = [t.detach().clone() for t in self._live]
        with torch.no_grad():
            torch._foreach_copy_([t.data for t in self._live], self.shadow)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                torch._foreach_copy_([t.data for t in self._live], live)
