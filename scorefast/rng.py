"""The noise stream: Philox4x32-10, counter (e // 4, step, sample id, stream), one key per seed.

``philox4x32_10`` and ``noise_ref`` are the readable torch reference of DESIGN.md's contract
(int64 arithmetic emulating uint32, no overflow); every backend reproduces them.
``randn`` / ``rand`` / ``rademacher`` are the public draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

M32 = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
UNIFORM_SCALE = torch.tensor(4.6566127342e-10, dtype=torch.float32)  # Triton's 2**-31 in fp32
TWO_PI_F32 = torch.tensor(6.283185307179586, dtype=torch.float32)
MIN_UNIFORM = 1e-7
MIN_UNIFORM_F32 = float(torch.tensor(MIN_UNIFORM, dtype=torch.float32))  # the clamp, rounded as the kernels round it
KINDS = {"uniform": 0, "normal": 1, "rademacher": 2}

# Streams of the allocation table (DESIGN.md).
STREAM_SAMPLER, STREAM_PROBES, STREAM_DSM, STREAM_PRIOR, STREAM_TIMES, STREAM_SLICED, STREAM_DEQUANT = range(7)
FIRST_USER_STREAM = 16


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for a uint32 constant a and uint32 values b held in int64."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p1, p2 = a * b_lo, a * b_hi  # each < 2**48
    low_sum = (p1 & M32) + ((p2 & 0xFFFF) << 16)
    return (p1 >> 32) + (p2 >> 16) + (low_sum >> 32), low_sum & M32


def philox4x32_10(c0, c1, c2, c3, k0, k1) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcast together)."""
    c0, c1, c2, c3, k0, k1 = (torch.as_tensor(v, dtype=torch.int64) for v in (c0, c1, c2, c3, k0, k1))
    for _ in range(10):
        hi0, lo0 = _mulhilo(PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W[0]) & M32
        k1 = (k1 + PHILOX_W[1]) & M32
    return c0, c1, c2, c3


def words_ref(
    seed: int, step: torch.Tensor | int, sample_ids: torch.Tensor, stream: int, elements: torch.Tensor
) -> torch.Tensor:
    """uint32 words (as int64) for every (sample id [B], element [E]) pair: shape [B, E]."""
    seed = int(seed) % (1 << 64)
    k0, k1 = torch.tensor(seed & M32), torch.tensor(seed >> 32)
    e = elements.to(torch.int64)[None, :]
    ids = sample_ids.to(torch.int64)[:, None]
    step = torch.as_tensor(step, dtype=torch.int64)
    c = philox4x32_10(e // 4, step, ids, torch.tensor(stream), k0, k1)
    stacked = torch.stack(torch.broadcast_tensors(*c), dim=-1)  # [B, E, 4]
    return stacked.gather(-1, (e % 4).expand(stacked.shape[:-1]).unsqueeze(-1)).squeeze(-1)


def uniform_ref(words: torch.Tensor) -> torch.Tensor:
    """fp32 uniforms: x = word as int32, negative x -> -x - 1, u = float32(x) * float32(2**-31)."""
    x = torch.where(words >= 1 << 31, words - (1 << 32), words)
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * UNIFORM_SCALE


def noise_ref(
    kind: str,
    seed: int,
    step: torch.Tensor | int,
    sample_ids: torch.Tensor,
    stream: int,
    D: int,
    elem_offset: int = 0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The contract's noise, [B, D], for elements elem_offset + arange(D) of each sample.

    Normals use Box-Muller in float64 on the fp32 uniforms (the golden values' definition).
    """
    device = sample_ids.device
    e = torch.arange(D, dtype=torch.int64, device=device) + elem_offset
    if kind == "normal":
        pair_first = e - e % 2  # element of the pair's radius word
        w_r = words_ref(seed, step, sample_ids, stream, pair_first)
        w_t = words_ref(seed, step, sample_ids, stream, pair_first + 1)
        u0 = uniform_ref(w_r).double().clamp_min(MIN_UNIFORM_F32)
        theta = (TWO_PI_F32 * uniform_ref(w_t)).double()  # 2*pi*u1 rounded as the kernels round it
        r = torch.sqrt(-2.0 * torch.log(u0))
        out = torch.where(e % 2 == 0, r * torch.cos(theta), r * torch.sin(theta))
    else:
        w = words_ref(seed, step, sample_ids, stream, e)
        out = uniform_ref(w).double() if kind == "uniform" else torch.where(w < 1 << 31, 1.0, -1.0).double()
    return out.to(dtype)


def _draw(kind: str, shape: Sequence[int], seed, step, stream, sample_ids, device, dtype, out, backend):
    from .ops.noise import noise

    return noise(
        shape,
        kind=kind,
        seed=seed,
        step=step,
        stream=stream,
        sample_ids=sample_ids,
        device=device,
        dtype=dtype,
        out=out,
        backend=backend,
    )


def randn(
    shape: Sequence[int],
    *,
    seed: int | torch.Tensor,
    step: int | torch.Tensor = 0,
    stream: int = 0,
    sample_ids: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Standard normals of the contract, shape ``shape`` = [B, ...] (B = batch, one sample id each).

    Element e of sample i is the same for any batch, backend, GPU count or memory format: it is
    a function of (seed, step, stream, sample_ids[i], e) only, e the row-major index in a sample.
    """
    return _draw("normal", shape, seed, step, stream, sample_ids, device, dtype, out, backend)


def rand(
    shape: Sequence[int],
    *,
    seed: int | torch.Tensor,
    step: int | torch.Tensor = 0,
    stream: int = 0,
    sample_ids: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Uniforms in [0, 1) of the contract (fp32 map of Triton's ``uint_to_uniform_float``)."""
    return _draw("uniform", shape, seed, step, stream, sample_ids, device, dtype, out, backend)


def rademacher(
    shape: Sequence[int],
    *,
    seed: int | torch.Tensor,
    step: int | torch.Tensor = 0,
    stream: int = STREAM_PROBES,
    sample_ids: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """±1 of the contract (+1 where the word is < 2**31); default stream 1 (Hutchinson probes)."""
    return _draw("rademacher", shape, seed, step, stream, sample_ids, device, dtype, out, backend)


__all__ = ["noise_ref", "philox4x32_10", "rademacher", "rand", "randn", "uniform_ref", "words_ref"]


def philox_seed(generator: torch.Generator | list | None = None) -> int:
    """One 64-bit seed in [0, 2**64) drawn from ``generator`` (default: torch's default CPU generator),
    so that ``torch.manual_seed`` / a diffusers ``generator=`` govern scorefast's Philox draws."""
    if isinstance(generator, list):
        generator = generator[0]
    device = generator.device if generator is not None else "cpu"
    hi, lo = torch.randint(0, 1 << 32, (2,), dtype=torch.int64, generator=generator, device=device).tolist()
    return (hi << 32) | lo
