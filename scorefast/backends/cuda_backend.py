"""The ``cuda`` backend: ``scorefast._cuda`` kernels (nvcc-built, no torch headers).

Launchers get ``data_ptr()``s and ``torch.cuda.current_stream().cuda_stream``, so launches land
on the current stream and CUDA graphs capture them.  Seed/step given as CUDA tensors are read on
the device (graph replay advances them); given on the CPU they pass by value.

With ``SCOREFAST_CUDA_EMULATE=1`` (read when the backend is first loaded, like Triton's
``TRITON_INTERPRET``) it runs CPU tensors through ``scorefast._cuda_host``: the same kernels,
launchers and bindings compiled for the host, each grid run on the CPU (``csrc/cuda/host_emulation.h``).
CPU tensors then play the device's part: a CPU seed/step tensor is read by the kernel through its
pointer, as a CUDA one is on a GPU.  It is how the CUDA code is tested without a GPU.
``SCOREFAST_CUDA_HOST_MODULE=PATH`` loads that build from a file instead (the tests' AddressSanitizer
build, which finds out-of-bounds accesses as compute-sanitizer would on a GPU).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from . import launch_device

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_module: ModuleType | None = None


def emulated() -> bool:
    return os.environ.get("SCOREFAST_CUDA_EMULATE", "0") == "1"


_EMULATED = emulated()
_HOST_MODULE_FILE = os.environ.get("SCOREFAST_CUDA_HOST_MODULE") if _EMULATED else None
_KERNEL_DEVICE = "cpu" if _EMULATED else "cuda"


def _load_host_module_file(path: str) -> ModuleType:
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.ExtensionFileLoader("scorefast._cuda_host", path)
    spec = importlib.util.spec_from_file_location("scorefast._cuda_host", path, loader=loader)
    if spec is None:
        raise ImportError(f"SCOREFAST_CUDA_HOST_MODULE: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def load() -> ModuleType:
    global _module
    if _module is None:
        if _HOST_MODULE_FILE:
            _module = _load_host_module_file(_HOST_MODULE_FILE)
        else:
            _module = importlib.import_module("scorefast._cuda_host" if _EMULATED else "scorefast._cuda")
    return _module


def module_state() -> tuple[bool, str]:
    """Whether the compiled module loads (no GPU needed): the ``cuda_module`` requirement."""
    try:
        m = load()
    except ImportError as err:
        from ..info import build_info

        part = build_info().get("parts", {}).get("_cuda", {})
        return False, f"{err} (build: {part.get('why', part.get('state', 'no record'))})"
    return True, f"scorefast._cuda built with CUDA runtime {m.cuda_runtime_version}"


def availability():
    if _EMULATED:
        try:
            load()
        except ImportError as err:
            return False, f"SCOREFAST_CUDA_EMULATE=1 but scorefast._cuda_host does not load: {err}", ()
        where = _HOST_MODULE_FILE or "scorefast._cuda_host"
        return True, f"{where}: the CUDA kernels run on the CPU (SCOREFAST_CUDA_EMULATE=1)", ("cpu",)
    ok, why = module_state()
    if not ok:
        return False, why, ()
    if not torch.cuda.is_available():
        return False, why + "; no CUDA device visible to torch", ()
    return True, why, ("cuda",)


def _on_device(v) -> bool:
    """Whether the kernel reads ``v`` through its pointer (it lives where the kernels run)."""
    return isinstance(v, torch.Tensor) and v.device.type == _KERNEL_DEVICE


def _counter(seed, step) -> tuple[int, int, int, int]:
    """(seed_ptr, step_ptr, seed, step): device scalars by pointer, ints and CPU tensors by value."""
    seed_ptr = seed.data_ptr() if _on_device(seed) else 0
    step_ptr = step.data_ptr() if _on_device(step) else 0
    seed_val = 0 if _on_device(seed) else int(seed) % (1 << 64)
    step_val = 0 if _on_device(step) else int(step)
    return seed_ptr, step_ptr, seed_val, step_val


def _coefs(coefs: torch.Tensor, row, k_stride: int, b_stride: int) -> tuple[int, int, int, int, int]:
    """(ptr, row_ptr, row_stride, k_stride, b_stride) of CoefArgs: a device row by pointer, a host
    one (a CPU tensor beside CUDA data) folded into the pointer."""
    if row is None:
        return coefs.data_ptr(), 0, 0, k_stride, b_stride
    if _on_device(row):
        return coefs.data_ptr(), row.data_ptr(), coefs.stride(0), k_stride, b_stride
    return coefs.data_ptr() + int(row) * coefs.stride(0) * coefs.element_size(), 0, 0, k_stride, b_stride


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def _stream(t: torch.Tensor) -> int:
    """The current stream of t's device (called under its device guard)."""
    return 0 if _EMULATED else torch.cuda.current_stream(t.device).cuda_stream


def _empty(shape, device) -> torch.Tensor:
    """fp32 scratch and outputs made by the launchers (one place, so a test can stand in for CUDA)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def fill_noise(out, ids, seed, step, stream, elem_offset, kind) -> None:
    B, D = out.shape
    with launch_device(out, sample_ids=ids):
        load().fill_noise(
            out.data_ptr(), B, D, elem_offset, kind, *_counter(seed, step), stream, ids.data_ptr(), _stream(out)
        )


def fused_update(out, x, terms, coefs, ids, seed, step, stream, with_noise, *, row=None, draws=1, draw=0, flag=None):
    """See ``torch_backend.fused_update``."""
    B, D = x.shape
    strides = (1, 0) if row is not None else (coefs.shape[1], int(coefs.shape[1] > 1))
    named_terms = {f"terms[{i}]": t for i, t in enumerate(terms)}
    with launch_device(x, out=out, coefs=coefs, sample_ids=ids, flag=flag, **named_terms):
        load().fused_update(
            out.data_ptr(),
            x.data_ptr(),
            _DTYPE_CODES[x.dtype],
            [t.data_ptr() for t in terms],
            [_DTYPE_CODES[t.dtype] for t in terms],
            *_coefs(coefs, row, *strides),
            with_noise,
            B,
            D,
            *_counter(seed, step),
            draws,
            draw,
            stream,
            _ptr(ids),
            _ptr(flag),
            _stream(x),
        )


def sumsq_norms(t, ids, D, seed, step, stream, with_noise, dtype=torch.float32) -> torch.Tensor:
    B = ids.shape[0]
    m = load()
    with launch_device(ids, t=t):
        out = _empty((2, B), ids.device)
        partial = _empty((2 * B * m.norm_tiles(D),), ids.device)
        m.sumsq_norms(
            out.data_ptr(),
            partial.data_ptr(),
            t.data_ptr() if t is not None else 0,
            _DTYPE_CODES[t.dtype] if t is not None else 0,
            with_noise,
            B,
            D,
            *_counter(seed, step),
            stream,
            ids.data_ptr(),
            _stream(ids),
        )
    return out


def snr_langevin_step(
    out, eps, x, score, alpha, two_snr2, ids, seed, step, stream, *, row=None, draws=1, draw=0, flag=None
) -> None:
    """See ``torch_backend.snr_langevin_step``."""
    B, D = x.shape
    m = load()
    if alpha is None:
        alpha_args = (0, 0, 0, 0, 0)
    else:
        alpha_args = _coefs(alpha, row, 0, int(row is None and alpha.shape[0] > 1))
    with launch_device(x, out=out, eps=eps, score=score, alpha=alpha, sample_ids=ids, flag=flag):
        size = m.snr_scratch_floats(B, D)
        scratch = _empty((size,), x.device) if size else None
        m.snr_langevin_step(
            out.data_ptr(),
            eps.data_ptr(),
            x.data_ptr(),
            _DTYPE_CODES[x.dtype],
            score.data_ptr(),
            _DTYPE_CODES[score.dtype],
            alpha_args[0],
            alpha_args[1],
            alpha_args[2],
            alpha_args[4],
            two_snr2,
            B,
            D,
            *_counter(seed, step),
            draws,
            draw,
            stream,
            _ptr(ids),
            _ptr(flag),
            _ptr(scratch),
            _stream(x),
        )


# The adaptive solvers' per-attempt ops: one launch each (select_rows: one per pair; step_control with
# batch_norm: a torch sum on the device first, as the triton backend does), on the current stream.
def scaled_sumsq(e, y, y2, rtol, atol, mode) -> torch.Tensor:
    """See ``scorefast.ops.scaled_sumsq``: fp32 [B], sumsq_norms' tiles and tree over the scaled rows.
    Rows of other dtypes (float64, or mixed) take the torch reference on the device."""
    code = _DTYPE_CODES.get(e.dtype)
    if code is None or y.dtype != e.dtype or y2.dtype != e.dtype:
        from . import torch_backend

        return torch_backend.scaled_sumsq(e, y, y2, rtol, atol, mode)
    B, D = e.shape
    m = load()
    with launch_device(e, y=y, y2=y2):
        out = _empty((B,), e.device)
        partial = _empty((max(B * m.norm_tiles(D), 1),), e.device)
        m.scaled_sumsq(
            out.data_ptr(), partial.data_ptr(), e.data_ptr(), y.data_ptr(), y2.data_ptr(), code, B, D, float(rtol),
            float(atol), 0 if mode == "rk45" else 1, _stream(e),
        )  # fmt: skip
    return out


def step_control(accept, state, sumsq, t_end, direction, n, c_stage, stage_t, base, mult, table, *scalars) -> None:
    """See ``scorefast.ops.step_control`` (``scalars``: numel, batch_norm, rule, safety, exponent,
    e_min_grow, e_min_retry, e_max, advance); the attempt counter n is read by the kernel where it lives
    there (a captured attempt's device counter), else passed by value."""
    numel, batch_norm, rule, safety, exponent, e_min_grow, e_min_retry, e_max, advance = scalars
    B = state.shape[1]
    n_ptr, n_val = (n.data_ptr(), 0) if _on_device(n) else (0, int(n))
    with launch_device(state, accept=accept, sumsq=sumsq, t_end=t_end, direction=direction, c_stage=c_stage,
                       stage_t=stage_t, base=base, mult=mult, table=table, n=n if n_ptr else None):  # fmt: skip
        batch_err = None
        if advance and batch_norm:  # one value for the batch (not batch-invariant by definition)
            batch_err = (sumsq.double().sum() / (sumsq.shape[0] * numel)).sqrt()
        load().step_control(
            accept.data_ptr(), state.data_ptr(), _ptr(sumsq), sumsq is not None and sumsq.dtype == torch.float64,
            t_end.data_ptr(), direction.data_ptr(), n_ptr, n_val, c_stage.data_ptr(), c_stage.numel(),
            stage_t.data_ptr(), base.data_ptr(), mult.data_ptr(), base.numel(), table.data_ptr(),
            table.dtype == torch.float64, B, int(numel), _ptr(batch_err), 0 if rule == "rk45" else 1, float(safety),
            float(exponent), float(e_min_grow), float(e_min_retry), float(e_max), bool(advance), _stream(state),
        )  # fmt: skip


def select_rows(mask, outs, news, olds) -> None:
    """out_i = new_i where the row's mask is set, else old_i: one launch per pair of contiguous rows."""
    B = mask.shape[0]
    m = load()
    pairs = {f"news[{i}]": v for i, v in enumerate(news)} | {f"olds[{i}]": v for i, v in enumerate(olds)}
    with launch_device(mask, **pairs, **{f"outs[{i}]": v for i, v in enumerate(outs)}):
        for out, new, old in zip(outs, news, olds, strict=True):
            row_bytes = out.numel() // B * out.element_size() if B else 0
            m.select_rows(out.data_ptr(), new.data_ptr(), old.data_ptr(), mask.data_ptr(), B, row_bytes, _stream(mask))


def sde_coefs(out, h, times, a, b, fa=None, fb=None) -> None:
    """See ``scorefast.ops.sde_coefs``: adaptive_sde's [10, B] table in one launch."""
    folds = {"fa": fa, "fb": fb} if fa is not None else {}
    with launch_device(h, out=out, times=times, a=a, b=b, **folds):
        load().sde_coefs(
            out.data_ptr(), out.dtype == torch.float64, h.data_ptr(), times.data_ptr(), a.data_ptr(), b.data_ptr(),
            _ptr(fa), _ptr(fb), h.shape[0], _stream(h),
        )  # fmt: skip
