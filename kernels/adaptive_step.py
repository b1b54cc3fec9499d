"""The adaptive solvers' per-attempt kernels: scaled error sums, the step controller, the row select.

``scaled_sumsq``: per-sample sums of squares of the scaled error (``scorefast.ops.scaled_sumsq``), in
tiles fixed by D alone (as ``sumsq_norms``), partials added in tile order: batch-invariant.
``step_control``: one program per block of samples, float64 (``scorefast.ops.step_control``); powers
as exp(log(x) * p) in float64 (libdevice's pow does not run under the interpreter).
``select_rows``: out = new where the row's mask is set, else old (one launch per pair).
``sde_coefs``: adaptive_sde's per-sample coefficient table (``scorefast.ops.sde_coefs``), float64, one cast.
No implicit fp fusion: each multiply and add rounds as the torch reference does (addcmul's explicit fma).
"""

import triton
import triton.language as tl

from .sumsq_norms import _sumsq_finish_kernel, tile_shape

OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _scaled_partial_kernel(partial_ptr, e_ptr, y_ptr, y2_ptr, rtol, atol, B, D, n_tiles, MODE: tl.constexpr,
                           ROWS: tl.constexpr, TILE_G: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    row_block = pid // n_tiles
    tile = pid % n_tiles
    b = row_block * ROWS + tl.arange(0, ROWS).to(tl.int64)
    g = tile * TILE_G + tl.arange(0, TILE_G).to(tl.int64)  # groups of 4, as sumsq_norms
    e_idx = 4 * g[None, :, None] + tl.arange(0, 4)[None, None, :].to(tl.int64)  # [1, G, 4]
    mask = (b[:, None, None] < B) & (e_idx < D)
    off = b[:, None, None] * D + e_idx
    e = tl.load(e_ptr + off, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32)
    y2 = tl.load(y2_ptr + off, mask=mask, other=0.0).to(tl.float32)
    big = tl.maximum(tl.abs(y), tl.abs(y2), propagate_nan=tl.PropagateNan.ALL) * rtol
    if MODE == 0:
        v = tl.div_rn(e, big + atol)
    else:
        scale = tl.where(big != big, big, tl.maximum(big, atol))
        v = tl.div_rn(e - y, scale)
    v = tl.where(mask, v, 0.0)
    tl.store(partial_ptr + b * n_tiles + tile, tl.sum(tl.sum(v * v, axis=2), axis=1), mask=b < B)


def scaled_sumsq(out, partial, e, y, y2, rtol: float, atol: float, mode: int, max_elements: int) -> None:
    """Launcher: ``out`` fp32 [B]; ``partial`` fp32 [B, n_tiles] scratch (``scaled_tiles``)."""
    B, D = e.shape
    if B == 0:
        return
    rows, tile_g = tile_shape(D, max_elements)
    n_tiles = triton.cdiv(max(D, 1), 4 * tile_g)
    grid = (triton.cdiv(B, rows) * n_tiles,)
    _scaled_partial_kernel[grid](partial, e, y, y2, rtol, atol, B, D, n_tiles, mode, rows, tile_g, **OPTIONS)
    _sumsq_finish_kernel[(triton.cdiv(B, 1024),)](out, partial, B, n_tiles, 1024, **OPTIONS)


def scaled_tiles(D: int, max_elements: int) -> int:
    return triton.cdiv(max(D, 1), 4 * tile_shape(D, max_elements)[1])


@triton.jit
def _pow(x, p):
    return tl.exp(tl.log(x) * p)


@triton.jit
def _step_control_kernel(
    acc_ptr,
    st_ptr,
    ss_ptr,
    te_ptr,
    dir_ptr,
    n_ptr,
    cs_ptr,
    stage_ptr,
    base_ptr,
    mult_ptr,
    table_ptr,
    B,
    S,
    R,
    numel,
    batch_err,
    params_ptr,
    RULE: tl.constexpr,
    BATCH: tl.constexpr,
    ADVANCE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = b < B
    r = tl.load(st_ptr + b, mask=m, other=0.0)
    h = tl.load(st_ptr + B + b, mask=m, other=0.0)
    t = tl.load(st_ptr + 7 * B + b, mask=m, other=0.0)
    safety = tl.load(params_ptr)  # float64 scalars (a Python float argument would be fp32)
    exponent = tl.load(params_ptr + 1)
    e_min_grow = tl.load(params_ptr + 2)
    e_min_retry = tl.load(params_ptr + 3)
    e_max = tl.load(params_ptr + 4)
    ok = r != r  # False (a bool block)
    if ADVANCE:
        ss = tl.load(ss_ptr + b, mask=m, other=0.0).to(tl.float64)
        if BATCH:
            err = ss * 0.0 + tl.load(batch_err)
        else:
            err = tl.sqrt(ss / numel)  # float64 sqrt is correctly rounded
        on = tl.load(st_ptr + 8 * B + b, mask=m, other=0.0) != 0.0
        ok = on & (err <= 1.0)
        down = on ^ ok
        r = tl.where(ok, r - h, r)
        steps = tl.load(st_ptr + 2 * B + b, mask=m, other=0.0)
        rej = tl.load(st_ptr + 3 * B + b, mask=m, other=0.0)
        retry = tl.load(st_ptr + 4 * B + b, mask=m, other=0.0) != 0.0
        fail = tl.load(st_ptr + 5 * B + b, mask=m, other=0.0)
        if RULE == 0:
            lo = tl.where(retry | down, e_min_retry, e_min_grow).to(tl.float32).to(tl.float64)
            c = tl.where(err != err, err, tl.minimum(tl.maximum(err, lo), e_max))
            h_new = h * (safety * _pow(c, -exponent))
        else:
            c = tl.where(err != err, err, tl.maximum(err, 1e-10))
            h_new = safety * h * _pow(c, -exponent)
        nonfinite = ~(tl.abs(err) <= 1.7976931348623157e308)
        stuck = down & (h_new <= 1.7763568394002505e-15 * tl.abs(t)) & ~nonfinite
        n = tl.load(n_ptr).to(tl.float64)
        fail = tl.where((nonfinite | stuck) & (fail < 0), tl.where(stuck, 0.5, 0.0) + n, fail)
        tl.store(st_ptr + 2 * B + b, steps + ok.to(tl.float64), mask=m)
        tl.store(st_ptr + 3 * B + b, rej + down.to(tl.float64), mask=m)
        tl.store(st_ptr + 4 * B + b, down.to(tl.float64), mask=m)
        tl.store(st_ptr + 5 * B + b, fail, mask=m)
        h = h_new
    tl.store(acc_ptr + b, ok.to(tl.int1), mask=m)
    te = tl.load(te_ptr + b, mask=m, other=0.0)
    h = tl.where((h != h) | (r != r), h + r, tl.minimum(h, r))
    if RULE == 0:
        d = tl.load(dir_ptr + b, mask=m, other=0.0)
        hs = h * d
        t = te + (-d) * r
    else:
        hs = h
        t = r + te
    tl.store(st_ptr + b, r, mask=m)
    tl.store(st_ptr + B + b, h, mask=m)
    tl.store(st_ptr + 6 * B + b, hs, mask=m)
    tl.store(st_ptr + 7 * B + b, t, mask=m)
    tl.store(st_ptr + 8 * B + b, (r > 0).to(tl.float64), mask=m)
    for s in range(0, S):
        c_s = tl.load(cs_ptr + s)
        tl.store(stage_ptr + s * B + b, tl.fma(c_s, hs, t), mask=m)  # addcmul: one rounding
    for k in range(0, R):
        v = tl.fma(tl.load(mult_ptr + k), hs, tl.load(base_ptr + k))
        tl.store(table_ptr + k * B + b, v.to(table_ptr.dtype.element_ty), mask=m)


def step_control(accept, state, sumsq, t_end, direction, n, c_stage, stage_t, base, mult, table, numel, batch_err,
                 rule: int, batch: bool, params, advance: bool, block: int) -> None:  # fmt: skip
    """Launcher; ``batch_err`` a 0-d float64 tensor holding the batch RMS (read when ``batch``); ``params``
    float64 [5] on the device: safety, exponent, e_min_grow, e_min_retry, e_max."""
    B = state.shape[1]
    if B == 0:
        return
    sumsq = sumsq if sumsq is not None else state  # not read unless advance
    batch_err = batch_err if batch_err is not None else state  # not read unless batch
    _step_control_kernel[(triton.cdiv(B, block),)](
        accept, state, sumsq, t_end, direction, n, c_stage, stage_t, base, mult, table, B, c_stage.numel(),
        base.numel(), numel, batch_err, params, rule, batch, advance, block,
        **OPTIONS,
    )  # fmt: skip


@triton.jit
def _select_kernel(out_ptr, new_ptr, old_ptr, mask_ptr, N, D, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inside = i < N
    keep = tl.load(mask_ptr + i // D, mask=inside, other=0) != 0
    v = tl.where(keep, tl.load(new_ptr + i, mask=inside & keep), tl.load(old_ptr + i, mask=inside & ~keep))
    tl.store(out_ptr + i, v, mask=inside)


def select_rows(mask, outs, news, olds, block: int) -> None:
    for out, new, old in zip(outs, news, olds, strict=True):
        N = out.numel()
        if N == 0:
            continue
        D = N // out.shape[0]
        _select_kernel[(triton.cdiv(N, block),)](out, new, old, mask, N, D, block, **OPTIONS)


@triton.jit
def _sde_coefs_kernel(out_ptr, h_ptr, times_ptr, a_ptr, b_ptr, fa_ptr, fb_ptr, B, FOLD: tl.constexpr,
                      BLOCK: tl.constexpr):  # fmt: skip
    b = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = b < B
    h = tl.load(h_ptr + b, mask=m, other=0.0)
    a0, a1 = tl.load(a_ptr + b, mask=m, other=0.0), tl.load(a_ptr + B + b, mask=m, other=0.0)
    b0, b1 = tl.load(b_ptr + b, mask=m, other=0.0), tl.load(b_ptr + B + b, mask=m, other=0.0)
    sh = tl.sqrt(h)  # float64: correctly rounded (sqrt.rn.f64), as torch and libm
    g0 = tl.sqrt(-b0) * sh  # the noise: the SDE's own b
    g1 = tl.sqrt(-b1) * sh
    if FOLD:  # an adapter's affine form: (a + b fa) x + (b fb) out, each product and sum rounded once
        fa0, fa1 = tl.load(fa_ptr + b, mask=m, other=0.0), tl.load(fa_ptr + B + b, mask=m, other=0.0)
        fb0, fb1 = tl.load(fb_ptr + b, mask=m, other=1.0), tl.load(fb_ptr + B + b, mask=m, other=1.0)
        a0, a1 = a0 + b0 * fa0, a1 + b1 * fa1
        b0, b1 = b0 * fb0, b1 * fb1
    half = 0.5 * h
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + b, (1.0 - h * a0).to(ty), mask=m)
    tl.store(out_ptr + B + b, (-(h * b0)).to(ty), mask=m)
    tl.store(out_ptr + 2 * B + b, g0.to(ty), mask=m)
    tl.store(out_ptr + 3 * B + b, (1.0 - half * a0).to(ty), mask=m)
    tl.store(out_ptr + 4 * B + b, (-(half * b0)).to(ty), mask=m)
    tl.store(out_ptr + 5 * B + b, (-(half * a1)).to(ty), mask=m)
    tl.store(out_ptr + 6 * B + b, (-(half * b1)).to(ty), mask=m)
    tl.store(out_ptr + 7 * B + b, (0.5 * (g0 + g1)).to(ty), mask=m)
    tl.store(out_ptr + 8 * B + b, tl.load(times_ptr + b, mask=m).to(ty), mask=m)
    tl.store(out_ptr + 9 * B + b, tl.load(times_ptr + B + b, mask=m).to(ty), mask=m)


def sde_coefs(out, h, times, a, b, fa, fb, block: int) -> None:
    """adaptive_sde's coefficient table (``scorefast.ops.sde_coefs``): one program per block of samples;
    fa, fb (or None) an adapter's affine coefficients, folded in."""
    B = h.shape[0]
    if B == 0:
        return
    fold = fa is not None
    grid = (triton.cdiv(B, block),)
    _sde_coefs_kernel[grid](out, h, times, a, b, fa if fold else a, fb if fold else b, B, fold, block, **OPTIONS)
