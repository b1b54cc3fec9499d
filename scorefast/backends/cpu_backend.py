"""The ``cpu`` backend: C++ kernels (``csrc/cpu``) built per ISA, picked at run time.

The module matching ``torch.backends.cpu.get_cpu_capability()`` (which honours
``ATEN_CPU_CAPABILITY``) is loaded; if it is missing, the next lower ISA, and why is recorded.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

_ORDER = ("avx512", "avx2", "default")
_module: ModuleType | None = None
_notes: list[str] = []


def _wanted() -> str:
    cap = torch.backends.cpu.get_cpu_capability().lower()
    return cap if cap in _ORDER else "default"


def runnable_isas() -> tuple[str, ...]:
    """The ISA builds this CPU can execute (importing a higher one dies with SIGILL)."""
    return _ORDER[_ORDER.index(_wanted()) :]


def load() -> ModuleType:
    global _module
    if _module is None:
        errors = []
        start = _ORDER.index(_wanted())
        for name in _ORDER[start:]:
            try:
                _module = importlib.import_module(f"scorefast._C_{name}")
                break
            except ImportError as err:
                errors.append(f"_C_{name}: {err}")
        _notes[:] = errors
        if _module is None:
            raise ImportError("; ".join(errors) + _build_hint())
    return _module


def _build_hint() -> str:
    from ..info import build_info

    parts = build_info().get("parts", {})
    reasons = [f"{k}: {v.get('why', v.get('state'))}" for k, v in parts.items() if k.startswith("_C") or k == "cpu"]
    return (" (build: " + "; ".join(reasons) + ")") if reasons else " (no build record: the extension was not built)"


def kernel(name: str):
    """The loaded build's kernel ``name``, or None (a build older than it: callers take their reference)."""
    return getattr(load(), name, None)


def availability():
    m = load()
    why = f"C++ kernels for {m.capability} ({m.vector_width} fp32 lanes), torch capability {_wanted().upper()}"
    if _notes:
        why += " [fell back: " + "; ".join(_notes) + "]"
    return True, why, ("cpu",)


def fill_noise(out, ids, seed, step, stream, elem_offset, kind) -> None:
    load().fill_noise(out, ids, int(seed) % (1 << 64), int(step), stream, elem_offset, kind)


def fused_update(out, x, terms, coefs, ids, seed, step, stream, with_noise, *, row=None, draws=1, draw=0, flag=None):
    """See ``torch_backend.fused_update``; the row and the counters are CPU tensors, read here."""
    if row is None and draws == 1 and draw == 0 and flag is None and ids is not None:
        load().fused_update(out, x, list(terms), coefs, ids, int(seed) % (1 << 64), int(step), stream, with_noise)
        return
    n = int(step)
    if row is None:
        offset, k_stride, b_stride = 0, coefs.shape[1], int(coefs.shape[1] > 1)
    else:
        offset, k_stride, b_stride = int(row) * coefs.stride(0), 1, 0
    load().fused_update_step(
        out, x, list(terms), coefs, offset, k_stride, b_stride, ids, int(seed) % (1 << 64),
        (n * draws + draw) % (1 << 32), stream, with_noise, flag, n,
    )  # fmt: skip


def snr_langevin_step(
    out, eps, x, score, alpha, two_snr2, ids, seed, step, stream, *, row=None, draws=1, draw=0, flag=None
) -> None:
    """See ``torch_backend.snr_langevin_step``."""
    n = int(step)
    if alpha is None:
        alpha, offset, b_stride = _ONE, 0, 0
    else:
        offset = 0 if row is None else int(row) * alpha.stride(0)
        b_stride = int(row is None and alpha.shape[0] > 1)
    load().snr_langevin_step(
        out, eps, x, score, alpha, offset, b_stride, two_snr2, ids, int(seed) % (1 << 64),
        (n * draws + draw) % (1 << 32), stream, flag, n,
    )  # fmt: skip


_ONE = torch.ones(1)


def sumsq_norms(t, ids, D, seed, step, stream, with_noise, dtype=torch.float32) -> torch.Tensor:
    out = torch.empty(2, ids.shape[0], dtype=torch.float32)
    load().sumsq_norms(out, t, ids, D, int(seed) % (1 << 64), int(step), stream, with_noise)
    return out


def scaled_sumsq(e, y, y2, rtol, atol, mode) -> torch.Tensor:
    out = torch.empty(e.shape[0], dtype=torch.float32)
    load().scaled_sumsq(out, e, y, y2, rtol, atol, 0 if mode == "rk45" else 1)
    return out


def step_control(accept, state, sumsq, t_end, direction, n, c_stage, stage_t, base, mult, table, *scalars) -> None:
    """See ``scorefast.ops.step_control`` (``scalars``: numel, batch_norm, rule, safety, exponent,
    e_min_grow, e_min_retry, e_max, advance); the attempt counter n is a CPU tensor, read here."""
    numel, batch_norm, rule, *rule_args, advance = scalars
    load().step_control(
        state, sumsq, t_end, direction, int(n), c_stage, stage_t, base, mult, table, accept,
        numel, batch_norm, 0 if rule == "rk45" else 1, *rule_args, advance,
    )  # fmt: skip


def select_rows(mask, outs, news, olds) -> None:
    load().select_rows(mask, list(outs), list(news), list(olds))


def sde_coefs(out, h, times, a, b, fa=None, fb=None) -> None:
    load().sde_coefs(out, h, times, a, b, fa, fb)
