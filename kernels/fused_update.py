"""Fused update: out = c_x*x + sum_t c_t*terms[t] + c_z*z, z the contract's normals made in-kernel.

Coefficients are a fp32 [K, C] tensor (K = number of terms + 2; C = B, or 1 for one column shared
by the batch); terms may be bf16/fp16 beside
fp32 state; arithmetic in fp32.  Up to 4 terms (unused slots get a dummy pointer).
"""

import triton
import triton.language as tl

from .philox import COMPILE_OPTIONS, COUNTER_ARGS, contract_words, flat_groups, group_values, load_counter

MAX_TERMS = 4


@triton.jit(do_not_specialize=COUNTER_ARGS)
def _fused_update_kernel(
    out_ptr,
    x_ptr,
    t0_ptr,
    t1_ptr,
    t2_ptr,
    t3_ptr,
    coef_ptr,
    ids_ptr,
    seed,
    step,
    B,
    D,
    coef_cols,
    coef_stride,
    stream: tl.constexpr,
    N_TERMS: tl.constexpr,
    WITH_NOISE: tl.constexpr,
    SEED_IS_PTR: tl.constexpr,
    STEP_IS_PTR: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    b, g, e, valid = flat_groups(tl.program_id(0), D, 0, BLOCK_G)
    in_batch = b < B
    mask = valid & in_batch[:, None]
    offs = b[:, None] * D + e
    coef_ptr += b * coef_stride  # coefficient (k, b) at k * coef_cols + b * coef_stride
    acc = tl.load(coef_ptr, mask=in_batch, other=0.0)[:, None] * tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    if N_TERMS > 0:
        c = tl.load(coef_ptr + coef_cols, mask=in_batch, other=0.0)[:, None]
        acc = tl.fma(c, tl.load(t0_ptr + offs, mask=mask).to(tl.float32), acc)
    if N_TERMS > 1:
        c = tl.load(coef_ptr + 2 * coef_cols, mask=in_batch, other=0.0)[:, None]
        acc = tl.fma(c, tl.load(t1_ptr + offs, mask=mask).to(tl.float32), acc)
    if N_TERMS > 2:
        c = tl.load(coef_ptr + 3 * coef_cols, mask=in_batch, other=0.0)[:, None]
        acc = tl.fma(c, tl.load(t2_ptr + offs, mask=mask).to(tl.float32), acc)
    if N_TERMS > 3:
        c = tl.load(coef_ptr + 4 * coef_cols, mask=in_batch, other=0.0)[:, None]
        acc = tl.fma(c, tl.load(t3_ptr + offs, mask=mask).to(tl.float32), acc)
    if WITH_NOISE:
        seed, step = load_counter(seed, step, SEED_IS_PTR, STEP_IS_PTR)
        sample_id = tl.load(ids_ptr + b, mask=in_batch, other=0)
        w0, w1, w2, w3 = contract_words(seed, g, step, sample_id, stream)
        z = group_values(w0, w1, w2, w3, 1)
        c = tl.load(coef_ptr + (N_TERMS + 1) * coef_cols, mask=in_batch, other=0.0)[:, None]
        acc = tl.fma(c, z, acc)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def fused_update(out, x, terms, coefs, ids, seed, step, stream: int, with_noise: bool, block_groups: int) -> None:
    """Launcher: ``out``/``x``/``terms`` contiguous [B, D]; ``coefs`` contiguous fp32 [len(terms) + 2, B or 1]."""
    B, D = x.shape
    if B == 0 or D == 0:
        return
    if len(terms) > MAX_TERMS:
        raise ValueError(f"terms: at most {MAX_TERMS} on the triton backend, got {len(terms)}")
    slots = list(terms) + [x] * (MAX_TERMS - len(terms))
    grid = (triton.cdiv(B * ((D + 3) // 4), block_groups),)
    _fused_update_kernel[grid](
        out,
        x,
        *slots,
        coefs,
        ids,
        seed,
        step,
        B,
        D,
        coefs.shape[1],
        0 if coefs.shape[1] == 1 else 1,
        stream,
        len(terms),
        with_noise,
        hasattr(seed, "data_ptr"),
        hasattr(step, "data_ptr"),
        block_groups,
        **COMPILE_OPTIONS,
    )
