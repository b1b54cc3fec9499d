"""Per-sample sums of squares of a tensor and of the contract's normals, in a fixed tree.

Pass 1 reduces tiles of TILE_G groups (4 elements each) counted from each sample's first
element into partial sums; pass 2 adds a sample's partials in tile order.  TILE_G and ROWS are
chosen from the sample size D alone, so the sums do not depend on the batch (DESIGN.md).
"""

import triton
import triton.language as tl

from .fused_update import STEP_ARGS, load_ids
from .philox import COMPILE_OPTIONS, contract_words, group_values, load_counter


@triton.jit(do_not_specialize=STEP_ARGS)
def _sumsq_partial_kernel(
    partial_ptr,
    t_ptr,
    ids_ptr,
    seed,
    step,
    draws,
    draw,
    B,
    D,
    n_tiles,
    stream: tl.constexpr,
    HAS_T: tl.constexpr,
    WITH_NOISE: tl.constexpr,
    SEED_IS_PTR: tl.constexpr,
    STEP_IS_PTR: tl.constexpr,
    HAS_IDS: tl.constexpr,
    ROWS: tl.constexpr,
    TILE_G: tl.constexpr,
):
    # one flat grid axis (CUDA allows 2**31 - 1 programs there, 65535 on axes 1 and 2): program
    # (row_block, tile) is row_block * n_tiles + tile, so neither the batch nor the sample size is
    # bounded by a grid axis
    pid = tl.program_id(0).to(tl.int64)
    row_block = pid // n_tiles
    tile = pid % n_tiles
    b = row_block * ROWS + tl.arange(0, ROWS).to(tl.int64)  # [R]
    g = tile * TILE_G + tl.arange(0, TILE_G).to(tl.int64)  # [G]
    e = 4 * g[None, :, None] + tl.arange(0, 4)[None, None, :].to(tl.int64)  # [1, G, 4]
    mask = (b[:, None, None] < B) & (e < D)
    slot = b * n_tiles + tile
    if HAS_T:
        v = tl.load(t_ptr + b[:, None, None] * D + e, mask=mask, other=0.0).to(tl.float32)
        tl.store(partial_ptr + slot, tl.sum(tl.sum(v * v, axis=2), axis=1), mask=b < B)
    if WITH_NOISE:
        seed, step = load_counter(seed, step, SEED_IS_PTR, STEP_IS_PTR)
        sample_id = load_ids(ids_ptr, b, b < B, HAS_IDS)
        w0, w1, w2, w3 = contract_words(
            seed, g[None, :] + 0 * sample_id[:, None], step * draws + draw, sample_id[:, None] + 0 * g[None, :], stream
        )
        z = _normals_3d(w0, w1, w2, w3)
        z = tl.where(mask, z, 0.0)
        tl.store(partial_ptr + B * n_tiles + slot, tl.sum(tl.sum(z * z, axis=2), axis=1), mask=b < B)


@triton.jit
def _normals_3d(w0, w1, w2, w3):
    """[R, G] words -> [R, G, 4] normals (the same values group_values gives on [G] words)."""
    R: tl.constexpr = w0.shape[0]
    G: tl.constexpr = w0.shape[1]
    v = group_values(
        tl.reshape(w0, (R * G,)), tl.reshape(w1, (R * G,)), tl.reshape(w2, (R * G,)), tl.reshape(w3, (R * G,)), 1
    )
    return tl.reshape(v, (R, G, 4))


@triton.jit
def _sumsq_finish_kernel(out_ptr, partial_ptr, rows, N_TILES: tl.constexpr, BLOCK: tl.constexpr):
    # N_TILES is a compile-time loop bound: triton 3.6's interpreter cannot take range() of a
    # runtime scalar under numpy >= 2.4, and it depends on D alone (one compile per sample size class)
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, N_TILES):
        acc += tl.load(partial_ptr + r * N_TILES + k, mask=r < rows, other=0.0)
    tl.store(out_ptr + r, acc, mask=r < rows)


def tile_shape(D: int, max_elements: int) -> tuple[int, int]:
    """(ROWS, TILE_G) from the sample size D alone: tiles of up to max_elements / 4 groups."""
    groups = max(1, (D + 3) // 4)
    tile_g = min(triton.next_power_of_2(groups), max_elements // 4)
    rows = max(1, max_elements // (4 * tile_g))
    return rows, tile_g


def sumsq_partial(
    partial, t, ids, seed, step, B: int, D: int, stream: int, with_noise: bool, max_elements: int, draws=1, draw=0
) -> int:
    """Pass 1 into ``partial`` fp32 [2, B, n_tiles]; ``ids`` None: arange(B).  Returns n_tiles."""
    rows, tile_g = tile_shape(D, max_elements)
    n_tiles = triton.cdiv(max(D, 1), 4 * tile_g)
    grid = (triton.cdiv(B, rows) * n_tiles,)
    _sumsq_partial_kernel[grid](
        partial,
        t if t is not None else partial,
        ids if ids is not None else partial,
        seed,
        step,
        draws,
        draw,
        B,
        D,
        n_tiles,
        stream,
        t is not None,
        with_noise,
        hasattr(seed, "data_ptr"),
        hasattr(step, "data_ptr"),
        ids is not None,
        rows,
        tile_g,
        **COMPILE_OPTIONS,
    )
    return n_tiles


def sumsq_norms(out, partial, t, ids, seed, step, D: int, stream: int, with_noise: bool, max_elements: int) -> None:
    """Launcher: ``out`` fp32 [2, B]; ``partial`` fp32 [2, B, n_tiles] scratch; ``t`` [B, D] or None."""
    B = ids.shape[0]
    if B == 0:
        return
    n_tiles = sumsq_partial(partial, t, ids, seed, step, B, D, stream, with_noise, max_elements)
    _sumsq_finish_kernel[(triton.cdiv(2 * B, 1024),)](out, partial, 2 * B, n_tiles, 1024, **COMPILE_OPTIONS)


def n_tiles_for(D: int, max_elements: int) -> int:
    _, tile_g = tile_shape(D, max_elements)
    return triton.cdiv(max(D, 1), 4 * tile_g)
