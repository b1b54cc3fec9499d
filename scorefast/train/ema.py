"""Exponential moving average of a model's parameters (and float buffers), multi-tensor updates."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Mapping

import torch

from .. import _checks


def _check_decay(decay: object) -> float:
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0.0 < float(decay) < 1.0:
        raise ValueError(f"decay: must be a number in (0, 1), got {decay!r}")
    return float(decay)


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name}: must be an int >= 0, got {value!r}")
    return int(value)


MAX_TABLE = 1 << 20  # longest warmup schedule tabulated for the device counter (entries)


def _saturation(decay: float, warmup: int) -> int:
    """The first update n with (1 + n) / (1 + n + warmup) >= decay (from then on d = decay)."""
    n = max(0, math.floor(decay * warmup / (1 - decay)) - 2)
    while (1 + n) / (1 + n + warmup) < decay:
        n += 1
    return n


class EMA:
    """shadow <- d * shadow + (1 - d) * live, with d = min(decay, (1 + n) / (1 + n + warmup)) at update n.

    The shadow copy is taken at construction.  An update is one ``torch._foreach_lerp_`` per
    (device, dtype) group of tracked tensors, whatever their number: lerp(shadow, live, 1 - d) is
    shadow + (1 - d) (live - shadow).  ``swap()`` puts the shadow weights into the model for the
    body of a ``with`` block and restores the live ones after, also on error.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: int = 0):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.model, self.decay, self.warmup = model, _check_decay(decay), _check_count("warmup", warmup)
        self.num_updates = 0
        self._live = self._tracked()
        self.shadow = [t.detach().clone() for t in self._live]
        groups: dict[tuple, tuple[list, list]] = {}
        for s, live in zip(self.shadow, self._live):
            pair = groups.setdefault((s.device, s.dtype), ([], []))
            pair[0].append(s)
            pair[1].append(live)
        self._groups = [(key, *pair) for key, pair in groups.items()]
        self._updates_t: torch.Tensor | None = None  # device-resident update counter (use_device_counter)
        # the device counter may be ahead of the host's once an update was captured (graph replays count
        # on the device only); until then they agree and, where the two weights round alike (fp32 and
        # float64 tensors), an eager update takes the host number, as the host path does
        self._captured = False
        self._host_weight_exact = all(dtype in (torch.float32, torch.float64) for (_, dtype), _, _ in self._groups)
        self._tables: tuple | None = None  # ((decay, warmup), per-group weight tables) for the device counter

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
        """One update: the decay from the counter, then one ``_foreach_lerp_`` per dtype group.

        With a device counter, while the warmup still lowers d, 1 - d is read from a device table of
        the schedule at the counter (clamped to its last entry, 1 - decay); once d = decay for good
        (the host counts its own calls, no read) the weight is the host number 1 - decay, as on the
        host path.  On fp32 and float64 tensors both paths give the same shadow bit for bit, so
        eagerly, before any update was captured (the counters agree until then), those groups take
        the host number in the warmup too (no table op); on bf16/fp16 tensors lerp rounds a tensor
        weight to the tensor's dtype (a host number it keeps in fp32), so there an update agrees
        within one ulp and the device path keeps the table."""
        d = self.current_decay()
        if self._updates_t is not None and _checks.is_capturing_or_compiling():
            self._captured = True
        if self._updates_t is not None and d < self.decay and (self._captured or not self._host_weight_exact):
            tables = self._weight_tables()
            if tables is not None:
                at = torch.clamp(self._updates_t, max=tables[0].shape[0] - 1)
                weights = [torch.take(table, at) for table in tables]
            else:  # a schedule too long to tabulate: 1 - d from the counter
                n = self._updates_t.to(torch.float64)
                weight = 1 - torch.clamp((n + 1) / (n + (1 + self.warmup)), max=self.decay)
                weights = [weight.to(device, dtype) for (device, dtype), _, _ in self._groups]
            for w, (_, shadow, live) in zip(weights, self._groups):
                torch._foreach_lerp_(shadow, live, [w] * len(shadow))
        else:
            for _, shadow, live in self._groups:
                torch._foreach_lerp_(shadow, live, 1.0 - d)
        if self._updates_t is not None:
            self._updates_t += 1
        self.num_updates += 1

    def _weight_tables(self) -> list[torch.Tensor] | None:
        """1 - d(n) for n = 0 .. N (d(N) = decay, the first saturated update) in each group's dtype and
        device, computed as the host path computes it; None when N exceeds MAX_TABLE."""
        key = (self.decay, self.warmup)
        if self._tables is None or self._tables[0] != key:
            n_sat = _saturation(self.decay, self.warmup)
            tables = None
            if n_sat < MAX_TABLE:
                tables = []
                for (device, dtype), _, _ in self._groups:  # made on the device: no copy, no sync
                    n = torch.arange(n_sat + 1, dtype=torch.float64, device=device)
                    tables.append((1 - torch.clamp((n + 1) / (n + (1 + self.warmup)), max=self.decay)).to(dtype))
            self._tables = (key, tables)
        return self._tables[1]

    def state_dict(self) -> dict:
        n = int(self._updates_t) if self._updates_t is not None else self.num_updates  # replays count on the device
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": n,
            "shadow": [t.clone() for t in self.shadow],
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a ``state_dict()``; every entry is checked (ValueError/TypeError naming it) before
        anything changes."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected a dict from EMA.state_dict(), got {type(state).__name__}")
        missing = sorted({"decay", "warmup", "num_updates", "shadow"} - set(state))
        if missing:
            raise ValueError(f"state: missing {', '.join(missing)}")
        decay = _check_decay(state["decay"])
        warmup = _check_count("warmup", state["warmup"])
        num_updates = _check_count("num_updates", state["num_updates"])
        shadow = state["shadow"]
        if not isinstance(shadow, list | tuple) or len(shadow) != len(self.shadow):
            n = len(shadow) if isinstance(shadow, list | tuple) else type(shadow).__name__
            raise ValueError(f"shadow: {n} tensors, the model tracks {len(self.shadow)}")
        for i, (t, mine) in enumerate(zip(shadow, self.shadow)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.shape != mine.shape:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"shadow[{i}]: expected a float tensor of shape {tuple(mine.shape)}, got {got}")
        self.decay, self.warmup, self.num_updates = decay, warmup, num_updates
        if self._updates_t is not None:
            self._updates_t.fill_(self.num_updates)
        with torch.no_grad():
            torch._foreach_copy_(self.shadow, [t.to(s.device, s.dtype) for t, s in zip(shadow, self.shadow)])

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
