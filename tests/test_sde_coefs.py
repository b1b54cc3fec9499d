"""``scorefast::sde_coefs`` (adaptive_sde's per-attempt coefficient table, issue 19 item 1) against its
readable reference and against exact rational arithmetic on every backend, batch invariance (B = 1, 7,
1000, bitwise), opcheck and argument errors."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from conftest import backend_params

import scorefast as sf
from scorefast.ops import sde_coefs as mod

BACKENDS = backend_params()


def _problem(B: int, seed: int = 0):
    """Steps h [B] (0 included: a done sample) and an SDE's (a, b) at times t, t - h [2, B]."""
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(B, generator=g, dtype=torch.float64) * 0.3
    h[::5] = 0.0
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.6 + 0.35
    times = torch.stack([t, t - h])
    a, b = sf.sde.VPSDE().reverse_coefs(times)
    return h, times, a.contiguous(), b.contiguous()


def _exact(h: float, t: list, a: list, b: list) -> list[float]:
    """The table's column for one sample, each product and sum rounded once to float64 (Fractions)."""
    r = lambda v: float(v)  # noqa: E731  (one rounding)
    sh = h**0.5  # IEEE sqrt is correctly rounded, as Python's
    g0, g1 = r(Fraction((-b[0]) ** 0.5) * Fraction(sh)), r(Fraction((-b[1]) ** 0.5) * Fraction(sh))
    H, half = Fraction(h), Fraction(h) / 2
    return [
        r(1 - Fraction(r(H * Fraction(a[0])))),
        r(-(H * Fraction(b[0]))),
        g0,
        r(1 - Fraction(r(half * Fraction(a[0])))),
        r(-(half * Fraction(b[0]))),
        r(-(half * Fraction(a[1]))),
        r(-(half * Fraction(b[1]))),
        r((Fraction(g0) + Fraction(g1)) / 2),
        t[0],
        t[1],
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sde_coefs_matches_exact_arithmetic_and_its_reference(backend, dtype):
    h, times, a, b = _problem(64, 1)
    got = mod.sde_coefs(h, times, a, b, dtype=dtype, backend=backend)
    assert got.shape == (10, 64) and got.dtype == dtype
    want = torch.tensor(
        [_exact(h[i].item(), times[:, i].tolist(), a[:, i].tolist(), b[:, i].tolist()) for i in range(64)],
        dtype=torch.float64,
    ).T.to(dtype)
    assert torch.equal(got, want)
    ref = torch.empty(10, 64, dtype=dtype)
    mod.sde_coefs_ref(ref, h, times, a, b)
    assert torch.equal(got, ref)


def test_sde_coefs_rows_are_adaptive_sde_updates():
    """The rows in float64 against the maths of the two updates, from the SDE's own drift and diffusion."""
    sde = sf.sde.VESDE()
    h, times, _, _ = _problem(16, 2)
    a, b = sde.reverse_coefs(times)
    got = mod.sde_coefs(h, times, a, b, dtype=torch.float64, backend="torch")
    f, g = sde.drift_coef(times), sde.diffusion(times)
    sh = h.sqrt()
    want = torch.stack([1 - h * f[0], h * g[0] ** 2, g[0] * sh, 1 - h / 2 * f[0], h / 2 * g[0] ** 2,
                        -h / 2 * f[1], h / 2 * g[1] ** 2, (g[0] + g[1]) / 2 * sh, times[0], times[1]])  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sde_coefs_is_batch_invariant(backend):
    h, times, a, b = _problem(1000, 3)
    big = mod.sde_coefs(h, times, a, b, backend=backend)
    for lo, hi in ((0, 1), (1, 8), (500, 1000)):
        part = mod.sde_coefs(h[lo:hi], times[:, lo:hi], a[:, lo:hi], b[:, lo:hi], backend=backend)
        assert torch.equal(part, big[:, lo:hi])


def test_sde_coefs_passes_opcheck():
    h, times, a, b = _problem(6)
    torch.library.opcheck(mod.sde_coefs_op, (h, times, a, b, torch.float32, "torch"))


def test_sde_coefs_argument_errors():
    h, times, a, b = _problem(4)
    with pytest.raises(ValueError, match="h:"):
        mod.sde_coefs(h.float(), times, a, b)
    with pytest.raises(TypeError, match="h:"):
        mod.sde_coefs([0.1] * 4, times, a, b)
    with pytest.raises(ValueError, match="times:"):
        mod.sde_coefs(h, times[:, :3], a, b)
    with pytest.raises(ValueError, match="a:"):
        mod.sde_coefs(h, times, a.float(), b)
    with pytest.raises(TypeError, match="b:"):
        mod.sde_coefs(h, times, a, None)
    with pytest.raises(TypeError, match="dtype:"):
        mod.sde_coefs(h, times, a, b, dtype=torch.bfloat16)
