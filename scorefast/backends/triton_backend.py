"""The ``triton`` backend: ``scorefast.kernels``.

On CUDA tensors it compiles; on CPU tensors it runs only under ``TRITON_INTERPRET=1``, which
Triton reads when a kernel is defined, so it must be set before ``scorefast.kernels`` is
imported and only in a process without CUDA (DESIGN.md).  Interpreted launches use large
blocks (64K elements) over a flat grid.
"""

from __future__ import annotations

import os

import torch
from packaging.version import Version

from . import launch_device

MIN_TRITON = Version("3.6")
_COMPILED_GROUPS = 256  # 1024 elements a program on a GPU
_INTERPRETED_GROUPS = 16384  # 64K elements a program under the interpreter


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def availability():
    import triton

    if Version(triton.__version__) < MIN_TRITON:
        return False, f"triton {triton.__version__} < {MIN_TRITON}", ()
    from .. import kernels  # noqa: F401  (defines the kernels: reads TRITON_INTERPRET now)

    if interpreted():
        return True, f"triton {triton.__version__} under TRITON_INTERPRET=1 (CPU tensors)", ("cpu",)
    if not torch.cuda.is_available():
        return False, f"triton {triton.__version__} needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)", ()
    return True, f"triton {triton.__version__}", ("cuda",)


def _groups() -> int:
    return _INTERPRETED_GROUPS if interpreted() else _COMPILED_GROUPS


def _scalar(t, device: torch.device):
    """A counter tensor stays a pointer if it lives where the kernel runs, else passes by value."""
    return t if isinstance(t, torch.Tensor) and t.device == device else int(t)


def fill_noise(out, ids, seed, step, stream, elem_offset, kind) -> None:
    from ..kernels import noise

    with launch_device(out, sample_ids=ids):
        noise.fill_noise(
            out, ids, _scalar(seed, out.device), _scalar(step, out.device), stream, elem_offset, kind, _groups()
        )


def _pointer(t, device: torch.device):
    """A row counter the kernel reads: on the kernel's device it stays a pointer, else its value
    becomes a 0-d tensor there (a CPU counter beside CUDA data: read on the host, as seed/step)."""
    if t is None or t.device == device:
        return t
    return torch.full((), int(t), dtype=torch.int64, device=device)


def fused_update(out, x, terms, coefs, ids, seed, step, stream, with_noise, *, row=None, draws=1, draw=0, flag=None):
    """See ``torch_backend.fused_update``."""
    from ..kernels import fused_update as kernel

    named_terms = {f"terms[{i}]": t for i, t in enumerate(terms)}
    with launch_device(x, out=out, coefs=coefs, sample_ids=ids, flag=flag, **named_terms):
        kernel.fused_update(
            out,
            x,
            list(terms),
            coefs,
            ids,
            _scalar(seed, x.device),
            _scalar(step, x.device),
            stream,
            with_noise,
            _groups(),
            row=_pointer(row, x.device),
            draws=draws,
            draw=draw,
            flag=flag,
        )


def sumsq_norms(t, ids, D, seed, step, stream, with_noise, dtype=torch.float32) -> torch.Tensor:
    from ..kernels import sumsq_norms as kernel

    max_elements = 4 * _groups()
    B = ids.shape[0]
    with launch_device(ids, t=t):
        out = torch.empty(2, B, dtype=torch.float32, device=ids.device)
        partial = torch.zeros(2, B, kernel.n_tiles_for(D, max_elements), dtype=torch.float32, device=ids.device)
        kernel.sumsq_norms(
            out,
            partial,
            t,
            ids,
            _scalar(seed, ids.device),
            _scalar(step, ids.device),
            D,
            stream,
            with_noise,
            max_elements,
        )
    return out


def snr_langevin_step(
    out, eps, x, score, alpha, two_snr2, ids, seed, step, stream, *, row=None, draws=1, draw=0, flag=None
) -> None:
    """See ``torch_backend.snr_langevin_step``."""
    from ..kernels import snr_langevin_step as kernel

    max_elements = 4 * _groups()
    B, D = x.shape
    if alpha is None:
        strides = (0, 0)
    else:
        strides = (alpha.stride(0), 0) if row is not None else (0, int(alpha.shape[0] > 1))
    with launch_device(x, out=out, eps=eps, score=score, alpha=alpha, sample_ids=ids, flag=flag):
        size = kernel.scratch_floats(B, D, max_elements)
        scratch = torch.zeros(size, dtype=torch.float32, device=x.device) if size else None
        kernel.snr_langevin_step(
            out,
            eps,
            x,
            score,
            alpha,
            strides,
            two_snr2,
            ids,
            _scalar(seed, x.device),
            _scalar(step, x.device),
            stream,
            max_elements,
            scratch,
            row=_pointer(row, x.device),
            draws=draws,
            draw=draw,
            flag=flag,
        )


def scaled_sumsq(e, y, y2, rtol, atol, mode) -> torch.Tensor:
    from ..kernels import adaptive_step as kernel

    max_elements = 4 * _groups()
    B, D = e.shape
    with launch_device(e, y=y, y2=y2):
        out = torch.empty(B, dtype=torch.float32, device=e.device)
        partial = torch.zeros(B, kernel.scaled_tiles(D, max_elements), dtype=torch.float32, device=e.device)
        kernel.scaled_sumsq(out, partial, e, y, y2, float(rtol), float(atol), 0 if mode == "rk45" else 1, max_elements)
    return out


def step_control(accept, state, sumsq, t_end, direction, n, c_stage, stage_t, base, mult, table, *scalars) -> None:
    """See ``scorefast.ops.step_control`` (``scalars``: numel, batch_norm, rule, safety, exponent,
    e_min_grow, e_min_retry, e_max, advance); ``batch_norm``'s one RMS over the batch is a torch sum on
    the device."""
    from ..kernels import adaptive_step as kernel

    numel, batch_norm, rule, *rule_args, advance = scalars
    if not isinstance(n, torch.Tensor):  # an eager loop's int attempt counter
        n = torch.full((), int(n), dtype=torch.int64, device=state.device)
    with launch_device(state, accept=accept, sumsq=sumsq, t_end=t_end, direction=direction, n=_pointer(n, state.device),
                       c_stage=c_stage, stage_t=stage_t, base=base, mult=mult, table=table):  # fmt: skip
        batch_err = None
        if advance and batch_norm:  # one value for the batch (not batch-invariant by definition)
            batch_err = (sumsq.double().sum() / (sumsq.shape[0] * numel)).sqrt()
        kernel.step_control(
            accept, state, sumsq, t_end, direction, _pointer(n, state.device), c_stage, stage_t, base, mult, table,
            numel, batch_err, 0 if rule == "rk45" else 1, bool(batch_norm and advance),
            _params(tuple(rule_args), state.device), advance, 1024,
        )  # fmt: skip


_PARAMS: dict = {}


def _params(values: tuple, device: torch.device) -> torch.Tensor:
    """The controller's float64 constants on the device, made once (an eager attempt runs before a
    capture, which then reads the same tensor)."""
    key = (values, device)
    if key not in _PARAMS:
        _PARAMS[key] = torch.tensor(values, dtype=torch.float64, device=device)
    return _PARAMS[key]


def select_rows(mask, outs, news, olds) -> None:
    from ..kernels import adaptive_step as kernel

    with launch_device(mask, **{f"news[{i}]": v for i, v in enumerate(news)}):
        kernel.select_rows(mask, list(outs), list(news), list(olds), 4 * _groups())


def sde_coefs(out, h, times, a, b, fa=None, fb=None) -> None:
    from ..kernels import adaptive_step as kernel

    folds = {"fa": fa, "fb": fb} if fa is not None else {}
    with launch_device(h, out=out, times=times, a=a, b=b, **folds):
        kernel.sde_coefs(out, h, times, a, b, fa, fb, 1024)
