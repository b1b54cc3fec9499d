"""Fused update: out = c_x*x + sum_t c_t*terms[t] + c_z*z, z the contract's normals made in-kernel.

Coefficient k of sample b is ``coef[row * row_stride + k * k_stride + b * b_stride]``: a fp32 [K, C]
matrix (K = number of terms + 2; C = B, or 1 for one column shared by the batch; no row), or row
``row`` of a per-run table [N, K] read by the kernel (``row`` a device step counter).  The Philox step
is ``step * draws + draw`` (the counter n of a sampler step and its draw j), computed in-kernel.  With
a flag (an int64 scalar holding -1), the first launch that stores a non-finite value writes its step
counter there.  Terms may be bf16/fp16 beside fp32 state; arithmetic in fp32.  Up to 4 terms (unused
slots get a dummy pointer).
"""

import triton
import triton.language as tl

from .philox import COMPILE_OPTIONS, COUNTER_ARGS, contract_words, flat_groups, group_values, load_counter

MAX_TERMS = 4
FLT_MAX = tl.constexpr(3.4028234663852886e38)
# the step counter's draws and draw change per sampler and draw: never specialised into constants
STEP_ARGS = (*COUNTER_ARGS, "draws", "draw")


@triton.jit
def record_nonfinite(flag_ptr, stored, mask, n):
    """Write the step counter n to *flag_ptr if a stored value (where mask) is not finite and the flag is -1.

    ``stored`` is what was written, converted back to fp32 (an fp16 state can overflow where fp32 did not).
    """
    bad = mask & ~(tl.abs(stored.to(tl.float32)) <= FLT_MAX)  # NaN compares false too
    if tl.sum(bad.to(tl.int32)) > 0:
        tl.atomic_cas(flag_ptr, n * 0 - 1, n)


# One return statement per helper: the compiler types every return of a function, also those of a
# constexpr branch it does not take (the interpreter does not).
@triton.jit
def load_row(row_ptr, HAS_ROW: tl.constexpr):
    """The table row (a device step counter) or 0."""
    row = tl.zeros([], dtype=tl.int64)
    if HAS_ROW:
        row = tl.load(row_ptr).to(tl.int64)
    return row


@triton.jit
def load_ids(ids_ptr, b, in_batch, HAS_IDS: tl.constexpr):
    """Sample ids of rows b (ids = arange(B) when there is no id tensor)."""
    ids = b
    if HAS_IDS:
        ids = tl.load(ids_ptr + b, mask=in_batch, other=0).to(tl.int64)
    return ids


@triton.jit(do_not_specialize=STEP_ARGS)
def _fused_update_kernel(
    out_ptr,
    x_ptr,
    t0_ptr,
    t1_ptr,
    t2_ptr,
    t3_ptr,
    coef_ptr,
    row_ptr,
    ids_ptr,
    flag_ptr,
    seed,
    step,
    draws,
    draw,
    B,
    D,
    row_stride,
    k_stride,
    b_stride,
    stream: tl.constexpr,
    N_TERMS: tl.constexpr,
    WITH_NOISE: tl.constexpr,
    SEED_IS_PTR: tl.constexpr,
    STEP_IS_PTR: tl.constexpr,
    HAS_ROW: tl.constexpr,
    HAS_IDS: tl.constexpr,
    HAS_FLAG: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    b, g, e, valid = flat_groups(tl.program_id(0), D, 0, BLOCK_G)
    in_batch = b < B
    mask = valid & in_batch[:, None]
    offs = b[:, None] * D + e
    coef_ptr += load_row(row_ptr, HAS_ROW) * row_stride + b * b_stride  # coefficient k at k * k_stride
    acc = tl.load(coef_ptr, mask=in_batch, other=0.0)[:, None] * tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    if N_TERMS > 0:
        c = tl.load(coef_ptr + k_stride, mask=in_batch, other=0.0)[:, None]
        acc = tl.fma(c, tl.load(t0_ptr + offs, mask=mask).to(tl.float32), acc)
    if N_TERMS > 1:
        c = tl.load(coef_ptr + 2 * k_stride, mask=in_batch, other=0.0)[:, None]
        acc = tl.fma(c, tl.load(t1_ptr + offs, mask=mask).to(tl.float32), acc)
    if N_TERMS > 2:
        c = tl.load(coef_ptr + 3 * k_stride, mask=in_batch, other=0.0)[:, None]
        acc = tl.fma(c, tl.load(t2_ptr + offs, mask=mask).to(tl.float32), acc)
    if N_TERMS > 3:
        c = tl.load(coef_ptr + 4 * k_stride, mask=in_batch, other=0.0)[:, None]
        acc = tl.fma(c, tl.load(t3_ptr + offs, mask=mask).to(tl.float32), acc)
    seed, step = load_counter(seed, step, SEED_IS_PTR, STEP_IS_PTR)
    if WITH_NOISE:
        sample_id = load_ids(ids_ptr, b, in_batch, HAS_IDS)
        w0, w1, w2, w3 = contract_words(seed, g, step * draws + draw, sample_id, stream)
        z = group_values(w0, w1, w2, w3, 1)
        c = tl.load(coef_ptr + (N_TERMS + 1) * k_stride, mask=in_batch, other=0.0)[:, None]
        acc = tl.fma(c, z, acc)
    stored = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, stored, mask=mask)
    if HAS_FLAG:
        record_nonfinite(flag_ptr, stored, mask, step)


def fused_update(
    out,
    x,
    terms,
    coefs,
    ids,
    seed,
    step,
    stream: int,
    with_noise: bool,
    block_groups: int,
    *,
    row=None,
    draws: int = 1,
    draw: int = 0,
    flag=None,
    strides: tuple[int, int, int] | None = None,
) -> None:
    """Launcher: ``out``/``x``/``terms`` contiguous [B, D]; ``coefs`` fp32: a contiguous [len(terms) + 2,
    B or 1] matrix, or with ``row`` (0-d int64 device tensor) a table [N, len(terms) + 2] whose row
    ``row`` is read in-kernel.  ``strides`` = (row_stride, k_stride, b_stride) overrides those two
    layouts.  ``ids`` None: ids = arange(B).  ``seed``/``step``: ints or 0-d int64 device tensors."""
    B, D = x.shape
    if B == 0 or D == 0:
        return
    if len(terms) > MAX_TERMS:
        raise ValueError(f"terms: at most {MAX_TERMS} on the triton backend, got {len(terms)}")
    if strides is None:
        strides = (coefs.stride(0), 1, 0) if row is not None else (0, coefs.shape[1], int(coefs.shape[1] > 1))
    slots = list(terms) + [x] * (MAX_TERMS - len(terms))
    grid = (triton.cdiv(B * ((D + 3) // 4), block_groups),)
    _fused_update_kernel[grid](
        out,
        x,
        *slots,
        coefs,
        coefs if row is None else row,
        x if ids is None else ids,
        x if flag is None else flag,
        seed,
        step,
        draws,
        draw,
        B,
        D,
        *strides,
        stream,
        len(terms),
        with_noise,
        hasattr(seed, "data_ptr"),
        hasattr(step, "data_ptr"),
        row is not None,
        ids is not None,
        flag is not None,
        block_groups,
        **COMPILE_OPTIONS,
    )
