"""Counter-based noise fill: out[b, e] = noise(seed, step, ids[b], stream, elem_offset + e)."""

import triton
import triton.language as tl

from .philox import COMPILE_OPTIONS, COUNTER_ARGS, contract_words, flat_groups, group_values, load_counter


@triton.jit(do_not_specialize=COUNTER_ARGS)
def _noise_kernel(
    out_ptr,
    ids_ptr,
    seed,
    step,
    B,
    D,
    elem_offset,
    stream: tl.constexpr,
    KIND: tl.constexpr,
    SEED_IS_PTR: tl.constexpr,
    STEP_IS_PTR: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    seed, step = load_counter(seed, step, SEED_IS_PTR, STEP_IS_PTR)
    b, g, e, valid = flat_groups(tl.program_id(0), D, elem_offset, BLOCK_G)
    in_batch = b < B
    sample_id = tl.load(ids_ptr + b, mask=in_batch, other=0)
    w0, w1, w2, w3 = contract_words(seed, g, step, sample_id, stream)
    v = group_values(w0, w1, w2, w3, KIND)
    tl.store(out_ptr + b[:, None] * D + e, v, mask=valid & in_batch[:, None])


def fill_noise(out, ids, seed, step, stream: int, elem_offset: int, kind: int, block_groups: int) -> None:
    """Launcher: ``out`` fp32 contiguous [B, D]; ``seed``/``step`` ints or 0-d int64 device tensors."""
    B, D = out.shape
    if B == 0 or D == 0:
        return
    groups = B * ((elem_offset + D - 1) // 4 - elem_offset // 4 + 1)
    grid = (triton.cdiv(groups, block_groups),)
    _noise_kernel[grid](
        out,
        ids,
        seed,
        step,
        B,
        D,
        elem_offset,
        stream,
        kind,
        hasattr(seed, "data_ptr"),
        hasattr(step, "data_ptr"),
        block_groups,
        **COMPILE_OPTIONS,
    )
