"""Philox4x32-10 and the noise contract in Triton, mirroring ``csrc/include/scorefast/philox.h``.

Precise math only (DESIGN.md): ``tl.sqrt_rn``, ``tl.log``, ``tl.sin``, ``tl.cos``; no
``libdevice`` (it does not run under ``TRITON_INTERPRET=1``).
"""

import triton
import triton.language as tl

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
UNIFORM_SCALE = tl.constexpr(4.6566127342e-10)
TWO_PI = tl.constexpr(6.283185307179586)
MIN_UNIFORM = tl.constexpr(1e-7)

# Compile options of every launch.  FP contraction stays on, as nvcc (--fmad=true) and g++ -O3
# compile the CUDA and C++ kernels; named here so the result does not follow Triton's default,
# which changes in 3.10.  Module globals read inside a kernel must be ``tl.constexpr(...)``
# objects: the compiler rejects plain or annotated ones (the interpreter does not).
COMPILE_OPTIONS = {"enable_fp_fusion": True}
# Triton specialises an int argument equal to 1 into a constant (and keys its cache on whether it is
# divisible by 16).  The counters change every call and step 1 is every sampler's second step: a
# constant 1 has no ``.to`` (load_counter) and would recompile per value class.  The kernels that take
# them say ``@triton.jit(do_not_specialize=COUNTER_ARGS)``.
COUNTER_ARGS = ("seed", "step")


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """10 rounds of Philox4x32 on uint32 counters (c0..c3) with key (k0, k1)."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(PHILOX_M0, c0)
        lo0 = tl.mul(c0, PHILOX_M0, sanitize_overflow=False)
        hi1 = tl.umulhi(PHILOX_M1, c2)
        lo1 = tl.mul(c2, PHILOX_M1, sanitize_overflow=False)
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = tl.add(k0, PHILOX_W0, sanitize_overflow=False)
        k1 = tl.add(k1, PHILOX_W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def contract_words(seed, group, step, sample_id, stream):
    """Words of counter (group, step, sample_id, stream), key (seed lo, seed hi); seed is int64."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = group.to(tl.uint32)
    zero = c0 * 0
    c1 = zero + step.to(tl.uint32)
    c2 = zero + sample_id.to(tl.uint32)
    c3 = zero + stream
    return philox4x32_10(c0, c1, c2, c3, k0, k1)


@triton.jit
def word_to_uniform(w):
    x = w.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, -x - 1, x)
    return x.to(tl.float32) * UNIFORM_SCALE


@triton.jit
def word_to_rademacher(w):
    return tl.where(w.to(tl.int32, bitcast=True) >= 0, 1.0, -1.0)


@triton.jit
def box_muller(w_r, w_theta):
    """One pair of normals from two words: r = sqrt(-2 ln max(1e-7, u0)), theta = 2 pi u1."""
    u0 = tl.maximum(word_to_uniform(w_r), MIN_UNIFORM)
    r = tl.sqrt_rn(-2.0 * tl.log(u0))
    theta = TWO_PI * word_to_uniform(w_theta)
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def group_values(w0, w1, w2, w3, KIND: tl.constexpr):
    """The 4 values of each group as a [G, 4] tile; KIND 0 uniform, 1 normal, 2 Rademacher."""
    if KIND == 1:
        v0, v1 = box_muller(w0, w1)
        v2, v3 = box_muller(w2, w3)
    elif KIND == 2:
        v0 = word_to_rademacher(w0)
        v1 = word_to_rademacher(w1)
        v2 = word_to_rademacher(w2)
        v3 = word_to_rademacher(w3)
    else:
        v0 = word_to_uniform(w0)
        v1 = word_to_uniform(w1)
        v2 = word_to_uniform(w2)
        v3 = word_to_uniform(w3)
    j = tl.arange(0, 4)[None, :]
    return tl.where(j == 0, v0[:, None], tl.where(j == 1, v1[:, None], tl.where(j == 2, v2[:, None], v3[:, None])))


@triton.jit
def load_counter(seed, step, SEED_IS_PTR: tl.constexpr, STEP_IS_PTR: tl.constexpr):
    """Seed and step from device scalars (graph replay advances them) or from values."""
    if SEED_IS_PTR:
        seed = tl.load(seed)
    if STEP_IS_PTR:
        step = tl.load(step)
    return seed.to(tl.int64), step.to(tl.int64)


@triton.jit
def flat_groups(pid, D, elem_offset, BLOCK_G: tl.constexpr):
    """Program ``pid``'s slice of the flat (sample, group) space, as [BLOCK_G] and [BLOCK_G, 4] tiles.

    Returns (sample index b, group index g, element index e [G, 4] within the sample, valid mask).
    """
    groups_per_sample = (elem_offset + D - 1) // 4 - elem_offset // 4 + 1
    f = pid.to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    b = f // groups_per_sample
    g = elem_offset // 4 + f % groups_per_sample
    e = 4 * g[:, None] + tl.arange(0, 4)[None, :].to(tl.int64) - elem_offset
    return b, g, e, (e >= 0) & (e < D)
