"""``scorefast::fused_update``: out = x_coef*x + sum_t c_t*terms[t] + noise*z, z made in-kernel.

Public op vs private kernels as in xformers: this file validates, flattens to [B, D], builds the
[K, C] coefficient matrix (C = 1 when every coefficient is shared by the batch, else B) and
calls the custom op, whose implementation hands the work to the resolved backend.  The custom
op has ``register_fake`` (shapes for torch.compile) and ``register_autograd``: gradients flow to
x, the terms and tensor coefficients (the noise is regenerated in backward, never stored).

The *step* ops ``scorefast::fused_update_step`` / ``_out`` are what one captured sampler step
launches (DESIGN.md "The one-launch step"): coefficients from a per-run device table [N, K] read at
the device step counter ``row`` (or a [K, C] matrix), the Philox step ``step * draws + draw``
computed in-kernel, ids = arange(B) when none are given, and an optional non-finite flag written by
the kernel.  They mutate the flag, so they record no gradients (use ``fused_update`` for those).
``fused_update_table`` is their public form; ``fused_update(..., flag=)`` reaches them too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _checks, backends
from . import _common
from .noise import noise_op

MAX_TERMS = 4


def _run(
    out: Tensor,
    x: Tensor,
    terms: list[Tensor],
    coefs: Tensor,
    seed: Tensor,
    step: Tensor,
    stream: int,
    sample_ids: Tensor,
    with_noise: bool,
    backend: str,
) -> None:
    _common.check_devices("fused_update", out.device, x=x, terms=terms, coefs=coefs, sample_ids=sample_ids)
    _common.check_ids("fused_update", sample_ids, out.shape[0])
    impl = backends.get(backend)
    if backend != "torch":
        coefs = coefs.to(torch.float32).contiguous()
    impl.fused_update(out, x, terms, coefs, sample_ids, seed, step, stream, with_noise)


@torch.library.custom_op("scorefast::fused_update", mutates_args=())
def fused_update_op(
    x: Tensor,
    terms: list[Tensor],
    coefs: Tensor,
    seed: Tensor,
    step: Tensor,
    stream: int,
    sample_ids: Tensor,
    with_noise: bool,
    backend: str,
) -> Tensor:
    """x, terms: contiguous [B, D]; coefs [len(terms) + 2, C], C = 1 or B (x, terms..., noise)."""
    out = torch.empty_like(x)
    _run(out, x, terms, coefs, seed, step, stream, sample_ids, with_noise, backend)
    return out


@fused_update_op.register_fake
def _(x, terms, coefs, seed, step, stream, sample_ids, with_noise, backend):
    # mixed devices dispatch here (the meta key wins): refuse them rather than return an empty tensor
    _common.check_devices("fused_update", x.device, terms=terms, coefs=coefs, sample_ids=sample_ids)
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, terms, coefs, seed, step, stream, sample_ids, with_noise, backend = inputs
    ctx.save_for_backward(x, coefs, seed, step, sample_ids, *terms)
    ctx.meta = (stream, with_noise, backend, len(terms))


def _backward(ctx, grad):
    stream, with_noise, backend, _n_terms = ctx.meta
    x, coefs, seed, step, sample_ids, *terms = ctx.saved_tensors
    g = grad.to(_checks.state_dtype(x))
    c = coefs.to(g.dtype)
    gx = (c[0, :, None] * g).to(x.dtype) if ctx.needs_input_grad[0] else None
    gterms = [(c[1 + t, :, None] * g).to(term.dtype) for t, term in enumerate(terms)]
    gcoefs = None
    if ctx.needs_input_grad[2]:
        rows = [(g * x.to(g.dtype)).sum(1)] + [(g * term.to(g.dtype)).sum(1) for term in terms]
        if with_noise:
            z = noise_op(sample_ids, seed, step, x.shape[1], stream, 0, 1, g.dtype, backend)
            rows.append((g * z).sum(1))
        else:
            rows.append(torch.zeros_like(rows[0]))
        gcoefs = torch.stack(rows)
        if coefs.shape[1] == 1:  # one column shared by the batch
            gcoefs = gcoefs.sum(1, keepdim=True)
        gcoefs = gcoefs.to(coefs.dtype)
    return gx, gterms, gcoefs, None, None, None, None, None, None


fused_update_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("scorefast::fused_update_out", mutates_args=("out",))
def fused_update_out_op(
    out: Tensor,
    x: Tensor,
    terms: list[Tensor],
    coefs: Tensor,
    seed: Tensor,
    step: Tensor,
    stream: int,
    sample_ids: Tensor,
    with_noise: bool,
    backend: str,
) -> None:
    """As ``fused_update`` but writes into ``out`` (contiguous [B, D]; may be x itself)."""
    _run(out, x, terms, coefs, seed, step, stream, sample_ids, with_noise, backend)


@fused_update_out_op.register_fake
def _(out, x, terms, coefs, seed, step, stream, sample_ids, with_noise, backend):
    _common.check_devices("fused_update_out", out.device, x=x, terms=terms, coefs=coefs, sample_ids=sample_ids)
    return None


def _run_step(
    out: Tensor,
    x: Tensor,
    terms: list[Tensor],
    coefs: Tensor,
    row: Tensor | None,
    seed: Tensor | int,
    step: Tensor | int,
    draws: int,
    draw: int,
    stream: int,
    sample_ids: Tensor | None,
    flag: Tensor | None,
    with_noise: bool,
    backend: str,
) -> None:
    if backend != "torch" and row is None:
        coefs = coefs.to(torch.float32).contiguous()
    backends.get(backend).fused_update(
        out, x, terms, coefs, sample_ids, seed, step, stream, with_noise, row=row, draws=draws, draw=draw, flag=flag
    )


@torch.library.custom_op("scorefast::fused_update_step", mutates_args=("flag",))
def fused_update_step_op(
    x: Tensor,
    terms: list[Tensor],
    coefs: Tensor,
    row: Tensor | None,
    seed: Tensor,
    step: Tensor,
    draws: int,
    draw: int,
    stream: int,
    sample_ids: Tensor | None,
    flag: Tensor | None,
    with_noise: bool,
    backend: str,
) -> Tensor:
    """out = c0*x + sum_t c_{1+t}*terms[t] + c_{T+1}*z for contiguous [B, D] x and terms.

    coefs: with ``row`` (0-d int64, the device step counter) a fp32 table [N, K] (K = len(terms) + 2,
    stride 1 along K) read at row ``row``; without, a [K, C] matrix (C = 1 or B).  The Philox step is
    ``step * draws + draw``; sample_ids None means arange(B); flag (0-d int64 holding -1, or None) is
    set to ``step`` by the first launch that writes a non-finite value.
    """
    out = torch.empty_like(x)
    _run_step(out, x, terms, coefs, row, seed, step, draws, draw, stream, sample_ids, flag, with_noise, backend)
    return out


@fused_update_step_op.register_fake
def _(x, terms, coefs, row, seed, step, draws, draw, stream, sample_ids, flag, with_noise, backend):
    return torch.empty_like(x)


@torch.library.custom_op("scorefast::fused_update_step_out", mutates_args=("out", "flag"))
def fused_update_step_out_op(
    out: Tensor,
    x: Tensor,
    terms: list[Tensor],
    coefs: Tensor,
    row: Tensor | None,
    seed: Tensor,
    step: Tensor,
    draws: int,
    draw: int,
    stream: int,
    sample_ids: Tensor | None,
    flag: Tensor | None,
    with_noise: bool,
    backend: str,
) -> None:
    """As ``fused_update_step`` but writes into ``out`` (contiguous [B, D]; may be x itself)."""
    _run_step(out, x, terms, coefs, row, seed, step, draws, draw, stream, sample_ids, flag, with_noise, backend)


@fused_update_step_out_op.register_fake
def _(out, x, terms, coefs, row, seed, step, draws, draw, stream, sample_ids, flag, with_noise, backend):
    return None


def refuse_grad_on_step(op: str, *tensors: Tensor | None) -> None:
    """The step ops mutate their flag, so torch.library records no gradients through them."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError(
            f"{op}: the table / flag form records no gradients (inputs require grad); use the tensor-"
            "coefficient form without flag= for autograd, or call it under torch.no_grad()"
        )


def check_step_args(x: Tensor, row, draws, draw, flag) -> None:
    """The step ops' own arguments: row, draws/draw and flag (names as the public functions use them)."""
    if row is not None:
        if not isinstance(row, Tensor) or row.dtype != torch.int64 or row.dim() != 0:
            raise TypeError(f"row: expected a 0-d int64 tensor (the device step counter), got {_describe(row)}")
        if row.device != x.device and row.device.type != "cpu":
            raise ValueError(f"row: on {row.device}, but x is on {x.device}")
    for name, v in (("draws", draws), ("draw", draw)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if not (draws >= 1 and 0 <= draw < draws):
        raise ValueError(f"draws, draw: need draws >= 1 and 0 <= draw < draws, got {draws}, {draw}")
    if flag is not None:
        if not isinstance(flag, Tensor) or flag.dtype != torch.int64 or flag.dim() != 0:
            raise TypeError(f"flag: expected a 0-d int64 tensor (initialised to -1), got {_describe(flag)}")
        if flag.device != x.device:
            raise ValueError(f"flag: on {flag.device}, but x is on {x.device}")


def _describe(v) -> str:
    return f"{v.dtype} tensor of shape {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__


def _host_numbers_fast_path(x: Tensor, terms, coef_values) -> bool:
    """The samplers' eager CPU steps: coefficients are host numbers, nothing traces or records
    autograd, and every tensor is already rows in memory.  Then the kernel takes the numbers
    directly (the same fp32 rounding as a coefficient tensor), with no tensor built per call."""
    if not x.is_cpu or x.shape[0] == 0 or x.numel() == 0 or not x.is_contiguous():
        return False
    if any(isinstance(cf, Tensor) for cf in coef_values) or _checks.use_custom_op(x, *(t for _, t in terms)):
        return False
    return all(t.is_contiguous() for _, t in terms)


def host_number_update(
    x: Tensor, terms, x_coef, noise, seed, step, stream: int, sample_ids: Tensor, with_noise: bool
) -> Tensor | None:
    """The samplers' eager CPU update on the cpu backend with host-number coefficients, by the
    shortest way (arguments were validated once per run; the terms' shape, dtype and device are
    checked by ``apply`` on every call, the ids here); None when it does not apply (a tensor
    coefficient, tracing, autograd, a layout that is not rows, not on the CPU): ``apply`` does it."""
    coef_values = [x_coef, *(cf for cf, _ in terms), noise]
    if not _host_numbers_fast_path(x, terms, coef_values):
        return None
    if not sample_ids.is_cpu or sample_ids.shape[0] != x.shape[0]:
        _common.check_devices("fused_update", x.device, sample_ids=sample_ids)
        _common.check_ids("fused_update", sample_ids, x.shape[0])
    from ..backends import cpu_backend

    B = x.shape[0]
    result = torch.empty_like(x)
    flat = x.dim() == 2  # already [B, D] rows
    D = x.numel() // B
    cpu_backend.load().fused_update_scalars(
        result if flat else result.view(B, D),
        x if flat else x.view(B, D),
        [t if flat else t.view(B, D) for _, t in terms],
        coef_values,
        sample_ids,
        int(seed) % (1 << 64),
        int(step),
        stream,
        with_noise,
    )
    return result


def apply(
    x: Tensor,
    terms: Sequence[tuple[float | Tensor, Tensor]],
    *,
    noise: float | Tensor,
    seed,
    step,
    stream,
    sample_ids,
    x_coef: float | Tensor,
    out: Tensor | None,
    backend: str | None,
    op: str = "fused_update",
    trusted: bool = False,
    flag: Tensor | None = None,
    draws: int = 1,
    draw: int = 0,
) -> Tensor:
    """Validated call shared by the public update ops (names in errors are the caller's).

    ``trusted=True`` (samplers, which validate once per run): ``backend`` is a resolved name,
    ``sample_ids`` a checked id tensor, coefficients finite by construction.
    ``flag`` / ``draws`` / ``draw``: the step op's non-finite flag and Philox step ``step * draws +
    draw`` (no gradients; see ``fused_update_step_op``).
    """
    terms = list(terms)
    stepped = flag is not None or (draws, draw) != (1, 0)
    if trusted:
        _common.check_terms(terms, x)  # the one per-call check: a kernel must never read foreign memory
        B = x.shape[0]
        name = backend
        c = _common.Counter(seed, step, stream, sample_ids)
        coef_values = [x_coef, *(cf for cf, _ in terms), noise]
    else:
        _checks.check_float_tensor("x", x)
        B = _checks.check_batched("x", x)
        if len(terms) > MAX_TERMS:  # the GPU kernels take at most 4: the same limit on every backend
            raise ValueError(f"terms: at most {MAX_TERMS} (coefficient, tensor) pairs, got {len(terms)}")
        for i, pair in enumerate(terms):
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                raise TypeError(f"terms[{i}]: expected a (coefficient, tensor) pair")
            _common.check_term(f"terms[{i}]", pair[1], x)
        coef_values = [_checks.check_coef("x_coef", x_coef, B, x.device)]
        coef_values += [
            _checks.check_coef(f"terms[{i}] coefficient", cf, B, x.device) for i, (cf, _) in enumerate(terms)
        ]
        coef_values.append(_checks.check_coef("noise", noise, B, x.device))
        name = _common.resolve_backend(backend, x)
        c = _common.counter(B, x.device, seed, step, stream, sample_ids)
    with_noise = isinstance(noise, Tensor) or noise != 0.0
    if trusted and name == "cpu" and out is None and not stepped:
        result = host_number_update(x, terms, x_coef, noise, c.seed, c.step, c.stream, c.sample_ids, with_noise)
        if result is not None:
            return result
    x2 = _common.rows(x)
    t2 = [_common.rows(t) for _, t in terms]
    coefs = _common.coef_matrix(coef_values, B, x.device, _checks.state_dtype(x))
    if out is not None and not trusted:
        _checks.check_float_tensor("out", out)
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(
                f"out: expected {tuple(x.shape)} {x.dtype} on {x.device}, got "
                f"{tuple(out.shape)} {out.dtype} on {out.device}"
            )
        _common.refuse_grad(op, x, out, coefs, *t2)
    if stepped:  # the step op: a flag, or the Philox step n*draws + draw made in-kernel
        if not trusted:
            check_step_args(x, None, draws, draw, flag)
        refuse_grad_on_step(op, x, coefs, *t2)
        ids = c.sample_ids
        return _launch_step(x, t2, coefs, None, c.seed, c.step, draws, draw, c.stream, ids, flag, with_noise, out, name)
    if not _checks.use_custom_op(x2, coefs, *t2):

        def fill(rows):
            _run(rows, x2, t2, coefs, c.seed, c.step, c.stream, c.sample_ids, with_noise, name)

    else:
        seed_t, step_t = _checks.counter_tensor(c.seed), _checks.counter_tensor(c.step)
        if out is None:
            return fused_update_op(x2, t2, coefs, seed_t, step_t, c.stream, c.sample_ids, with_noise, name).view(
                x.shape
            )

        def fill(rows):
            fused_update_out_op(rows, x2, t2, coefs, seed_t, step_t, c.stream, c.sample_ids, with_noise, name)

    return _common.into_rows(out if out is not None else torch.empty_like(x), fill)


def _as_rows(t: Tensor) -> Tensor:
    """[B, ...] as contiguous [B, D] rows; a tensor that already is one is passed as itself (no view
    node in a trace)."""
    return t if t.dim() == 2 and t.is_contiguous() else _common.rows(t)


def _launch_step(x, t2, coefs, row, seed, step, draws, draw, stream, ids, flag, with_noise, out, name) -> Tensor:
    """The step op on rows (eagerly: the backend itself), into ``out`` or a new tensor shaped like x."""
    x2 = _as_rows(x)
    if _checks.use_custom_op(x2, coefs, *t2):
        seed_t, step_t = _checks.counter_tensor(seed), _checks.counter_tensor(step)
        if out is None:
            result = fused_update_step_op(
                x2, t2, coefs, row, seed_t, step_t, draws, draw, stream, ids, flag, with_noise, name
            )
            return result if result.shape == x.shape else result.view(x.shape)

        def fill(rows):
            fused_update_step_out_op(
                rows, x2, t2, coefs, row, seed_t, step_t, draws, draw, stream, ids, flag, with_noise, name
            )

    else:

        def fill(rows):
            _run_step(rows, x2, t2, coefs, row, seed, step, draws, draw, stream, ids, flag, with_noise, name)

    return _common.into_rows(out if out is not None else torch.empty_like(x), fill)


def fused_update_table(
    x: Tensor,
    terms: Sequence[Tensor],
    table: Tensor,
    row: Tensor,
    *,
    seed: int | Tensor,
    draws: int = 1,
    draw: int = 0,
    with_noise: bool = True,
    stream: int = 0,
    sample_ids: Tensor | None = None,
    flag: Tensor | None = None,
    out: Tensor | None = None,
    backend: str | None = None,
    _trusted: bool = False,
) -> Tensor:
    """One sampler step's update with its coefficients from a per-run table, in one launch.

    ``out = c[0]*x + sum_t c[1+t]*terms[t] + c[-1]*z`` with ``c = table[row]`` read by the kernel and z
    the stream's normals at Philox step ``row * draws + draw`` (draw j of step n, computed in-kernel).

    Args:
        x: state [B, ...] (float32, or float16/bfloat16; float64 on the torch backend).
        terms: up to 4 tensors shaped like x (bf16/fp16 allowed beside fp32 x).
        table: [N, len(terms) + 2] coefficients (x, terms..., noise) on x's device, float32 (float64
            with float64 x on the torch backend), contiguous along its last dimension; one row per
            step, shared by the batch.  Per-sample coefficients take ``fused_update`` ([B] tensors).
        row: 0-d int64 tensor, the step counter n (on x's device; a graph replay advances it in
            place).  0 <= row < N is the caller's promise: the kernel cannot check it without a sync.
        seed: int or 0-d int64 tensor (a device tensor keeps one captured graph valid for any seed).
        draws, draw: S and j of DESIGN.md's k = n*S + j (0 <= draw < draws).
        with_noise: False skips the noise (its column is then not read).
        sample_ids: int64 [B]; None means arange(B), made in-kernel.
        flag: 0-d int64 tensor on x's device holding -1: set to ``row`` if a value written is not
            finite (a NaN/inf term, or a finite term that overflows), unless already set.
        out: write here (may be x).

    Records no gradients (ValueError if an input requires grad).  Under tracing it is one
    ``scorefast::fused_update_step`` node and nothing else when x and the terms are [B, D] rows.
    """
    terms = list(terms)
    if not _trusted:
        _checks.check_float_tensor("x", x)
        B = _checks.check_batched("x", x)
        if len(terms) > MAX_TERMS:
            raise ValueError(f"terms: at most {MAX_TERMS}, got {len(terms)}")
        for i, t in enumerate(terms):
            _common.check_term(f"terms[{i}]", t, x)
        _check_table(table, x, len(terms) + 2, backend)
        if row is None:
            raise TypeError("row: expected a 0-d int64 tensor (the device step counter), got None")
        check_step_args(x, row, draws, draw, flag)
        name = _common.resolve_backend(backend, x)
        seed = _checks.check_counter("seed", seed, x.device, upper=_checks.UINT64)
        stream = _checks.check_stream(stream)
        if sample_ids is not None:
            sample_ids = _checks.check_sample_ids(sample_ids, B, x.device)
        if out is not None:
            _check_out(out, x)
    else:
        name = backend
    t2 = [_as_rows(t) for t in terms]
    refuse_grad_on_step("fused_update_table", x, table, out, *t2)
    return _launch_step(x, t2, table, row, seed, row, draws, draw, stream, sample_ids, flag, with_noise, out, name)


MAX_TERMS = 4


def _check_table(table, x: Tensor, K: int, backend: str | None) -> None:
    if not isinstance(table, Tensor) or not table.is_floating_point():
        raise TypeError(f"table: expected a float tensor [N, {K}], got {_describe(table)}")
    if table.dim() != 2 or table.shape[1] != K or table.shape[0] < 1:
        raise ValueError(f"table: expected shape [N, {K}] (x, terms..., noise), got {tuple(table.shape)}")
    if table.device != x.device:
        raise ValueError(f"table: on {table.device}, but x is on {x.device}")
    wanted = torch.float64 if x.dtype == torch.float64 else torch.float32
    if table.dtype != wanted:
        raise TypeError(f"table: expected {wanted} for {x.dtype} x, got {table.dtype}")
    if table.stride(1) != 1:
        raise ValueError(f"table: must be contiguous along its last dimension, got strides {table.stride()}")


def _check_out(out, x: Tensor) -> None:
    _checks.check_float_tensor("out", out)
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out: expected {tuple(x.shape)} {x.dtype} on {x.device}, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )


def fused_update(
    x: Tensor,
    terms: Sequence[tuple[float | Tensor, Tensor]] = (),
    *,
    noise: float | Tensor = 0.0,
    seed: int | Tensor = 0,
    step: int | Tensor = 0,
    stream: int = 0,
    sample_ids: Tensor | None = None,
    x_coef: float | Tensor = 1.0,
    out: Tensor | None = None,
    return_norms: bool = False,
    backend: str | None = None,
    flag: Tensor | None = None,
):
    """``out = x_coef*x + sum(c*t for c, t in terms) + noise*z`` with z ~ N(0, I) from the stream.

    Args:
        x: state [B, ...], float32 (or float16/bfloat16; float64 on the torch backend).
        terms: up to 4 pairs (coefficient, tensor shaped like x; bf16/fp16 allowed with fp32 x).
        noise, x_coef, coefficients: Python numbers, 0-d or [B] tensors (per sample).
        seed, step: ints or 0-d int64 tensors; stream, sample_ids: see ``scorefast.randn``.
        out: write here (may be x); not for inputs that require grad.
        return_norms: also return (||terms[0]|| [B], ||z|| [B]) in fixed summation order.
        flag: 0-d int64 tensor holding -1: the kernel sets it to ``step`` if a value it writes is not
            finite (and it is still -1).  No gradients with a flag (the op mutates it).
    """
    result = apply(
        x,
        terms,
        noise=noise,
        seed=seed,
        step=step,
        stream=stream,
        sample_ids=sample_ids,
        x_coef=x_coef,
        out=out,
        backend=backend,
        flag=flag,
    )
    if not return_norms:
        return result
    from .sample_norm import noise_and_term_norms

    t0 = terms[0][1] if terms else None
    term_norm, z_norm = noise_and_term_norms(
        t0, x, seed=seed, step=step, stream=stream, sample_ids=sample_ids, backend=backend
    )
    return result, term_norm, z_norm
