"""score_sde's Langevin corrector with per-sample norms, fused.

eps_b = (two_snr2 * alpha_b) * (|z_b|^2 / |score_b|^2) in fp32 (0 where the score norm is 0), then
out = x + eps*score + sqrt(2 eps)*z with z the contract's normals (made in-kernel, never stored).
alpha_b = ``alpha[row * row_stride + b * b_stride]`` (a per-run table read at the device step
counter, or a [1] / [B] tensor); the Philox step is ``step * draws + draw``.

Samples of at most ONE_KERNEL_MAX_D elements take one kernel: a program holds ROWS whole samples,
sums their squares (a tile shape fixed by D alone), and updates them from the same registers.
Larger ones take three launches: partial sums (``sumsq_norms``), the step sizes as a [3, B]
coefficient matrix, and the fused update.
"""

import triton
import triton.language as tl

from .fused_update import STEP_ARGS, fused_update, load_ids, load_row, record_nonfinite
from .philox import COMPILE_OPTIONS, contract_words, load_counter
from .sumsq_norms import _normals_3d, sumsq_partial, tile_shape

ONE_KERNEL_MAX_D = 8192


@triton.jit
def snr_eps(g2, z2, alpha, two_snr2):
    """The step size from the squared norms, as the composed op rounds it (correctly rounded divide)."""
    scored = g2 > 0.0
    return tl.where(scored, (two_snr2 * alpha) * tl.div_rn(z2, tl.where(scored, g2, 1.0)), 0.0)


@triton.jit
def load_alpha(alpha_ptr, row_ptr, b, live, row_stride, b_stride, HAS_ALPHA: tl.constexpr, HAS_ROW: tl.constexpr):
    """alpha of samples b: alpha[row * row_stride + b * b_stride], or 1 without an alpha tensor."""
    alpha = tl.full(b.shape, 1.0, tl.float32)
    if HAS_ALPHA:
        alpha_ptr += load_row(row_ptr, HAS_ROW) * row_stride
        alpha = tl.load(alpha_ptr + b * b_stride, mask=live, other=0.0)
    return alpha


@triton.jit(do_not_specialize=STEP_ARGS)
def _snr_rows_kernel(
    out_ptr,
    eps_ptr,
    x_ptr,
    score_ptr,
    alpha_ptr,
    row_ptr,
    ids_ptr,
    flag_ptr,
    seed,
    step,
    draws,
    draw,
    B,
    D,
    alpha_row_stride,
    alpha_b_stride,
    two_snr2,
    stream: tl.constexpr,
    SEED_IS_PTR: tl.constexpr,
    STEP_IS_PTR: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    HAS_ROW: tl.constexpr,
    HAS_IDS: tl.constexpr,
    HAS_FLAG: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)  # [R]
    g = tl.arange(0, BLOCK_G).to(tl.int64)  # [G]: the whole sample
    e = 4 * g[None, :, None] + tl.arange(0, 4)[None, None, :].to(tl.int64)  # [1, G, 4]
    in_batch = b < B
    mask = in_batch[:, None, None] & (e < D)
    offs = b[:, None, None] * D + e
    s = tl.load(score_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    seed, step = load_counter(seed, step, SEED_IS_PTR, STEP_IS_PTR)
    sample_id = load_ids(ids_ptr, b, in_batch, HAS_IDS)
    w0, w1, w2, w3 = contract_words(
        seed, g[None, :] + 0 * sample_id[:, None], step * draws + draw, sample_id[:, None] + 0 * g[None, :], stream
    )
    z = tl.where(mask, _normals_3d(w0, w1, w2, w3), 0.0)
    g2 = tl.sum(tl.sum(s * s, axis=2), axis=1)
    z2 = tl.sum(tl.sum(z * z, axis=2), axis=1)
    alpha = load_alpha(alpha_ptr, row_ptr, b, in_batch, alpha_row_stride, alpha_b_stride, HAS_ALPHA, HAS_ROW)
    eps = snr_eps(g2, z2, alpha, two_snr2)
    tl.store(eps_ptr + b, eps, mask=in_batch)
    acc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # x_coef 1: acc = x
    acc = tl.fma(eps[:, None, None], s, acc)
    acc = tl.fma(tl.sqrt_rn(2.0 * eps)[:, None, None], z, acc)
    stored = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, stored, mask=mask)
    if HAS_FLAG:
        record_nonfinite(flag_ptr, stored, mask, step)


@triton.jit
def _snr_coef_kernel(
    coef_ptr,
    eps_ptr,
    partial_ptr,
    alpha_ptr,
    row_ptr,
    alpha_row_stride,
    alpha_b_stride,
    two_snr2,
    B,
    N_TILES: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    HAS_ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Step sizes of large samples from the partial sums (tiles in order) as the update's [3, B]
    coefficients (1, eps, sqrt(2 eps)), and eps [B]."""
    b = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    live = b < B
    g2 = tl.zeros([BLOCK], dtype=tl.float32)
    z2 = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, N_TILES):
        g2 += tl.load(partial_ptr + b * N_TILES + k, mask=live, other=0.0)
    for k in range(0, N_TILES):
        z2 += tl.load(partial_ptr + (B + b) * N_TILES + k, mask=live, other=0.0)
    alpha = load_alpha(alpha_ptr, row_ptr, b, live, alpha_row_stride, alpha_b_stride, HAS_ALPHA, HAS_ROW)
    eps = snr_eps(g2, z2, alpha, two_snr2)
    tl.store(eps_ptr + b, eps, mask=live)
    tl.store(coef_ptr + b, tl.full([BLOCK], 1.0, tl.float32), mask=live)
    tl.store(coef_ptr + B + b, eps, mask=live)
    tl.store(coef_ptr + 2 * B + b, tl.sqrt_rn(2.0 * eps), mask=live)


def scratch_floats(B: int, D: int, max_elements: int) -> int:
    """fp32 scratch the launcher needs: none for one-kernel samples, else partial sums and coefficients."""
    if D <= ONE_KERNEL_MAX_D:
        return 0
    _, tile_g = tile_shape(D, max_elements)
    return 2 * B * triton.cdiv(D, 4 * tile_g) + 3 * B


def snr_langevin_step(
    out,
    eps,
    x,
    score,
    alpha,
    alpha_strides: tuple[int, int],
    two_snr2: float,
    ids,
    seed,
    step,
    stream: int,
    max_elements: int,
    scratch,
    *,
    row=None,
    draws: int = 1,
    draw: int = 0,
    flag=None,
) -> None:
    """Launcher: ``out``/``x``/``score`` contiguous [B, D]; ``eps`` fp32 [B]; ``alpha`` fp32 read at
    ``row * alpha_strides[0] + b * alpha_strides[1]`` (row 0 without ``row``; None: alpha = 1); ``scratch`` fp32 of
    ``scratch_floats(B, D, max_elements)`` elements (or None when that is 0); ``ids`` None: arange(B)."""
    B, D = x.shape
    if B == 0:
        return
    if D == 0:
        eps.zero_()
        return
    has = dict(HAS_ALPHA=alpha is not None, HAS_ROW=row is not None, HAS_IDS=ids is not None)
    dummy = dict(alpha=eps if alpha is None else alpha, row=eps if row is None else row, ids=x if ids is None else ids)
    if D <= ONE_KERNEL_MAX_D:
        block_g = triton.next_power_of_2((D + 3) // 4)
        rows = max(1, max_elements // (4 * block_g))
        _snr_rows_kernel[(triton.cdiv(B, rows),)](
            out,
            eps,
            x,
            score,
            dummy["alpha"],
            dummy["row"],
            dummy["ids"],
            x if flag is None else flag,
            seed,
            step,
            draws,
            draw,
            B,
            D,
            *alpha_strides,
            two_snr2,
            stream,
            hasattr(seed, "data_ptr"),
            hasattr(step, "data_ptr"),
            HAS_FLAG=flag is not None,
            ROWS=rows,
            BLOCK_G=block_g,
            **has,
            **COMPILE_OPTIONS,
        )
        return
    n_tiles = sumsq_partial(scratch, score, ids, seed, step, B, D, stream, True, max_elements, draws, draw)
    coefs = scratch[2 * B * n_tiles : 2 * B * n_tiles + 3 * B]
    _snr_coef_kernel[(triton.cdiv(B, 1024),)](
        coefs, eps, scratch, dummy["alpha"], dummy["row"], *alpha_strides, two_snr2, B, n_tiles, alpha is not None,
        row is not None, 1024,
        **COMPILE_OPTIONS,
    )  # fmt: skip
    fused_update(
        out, x, [score], coefs, ids, seed, step, stream, True, max_elements // 4,
        draws=draws, draw=draw, flag=flag, strides=(0, B, 1),
    )  # fmt: skip
