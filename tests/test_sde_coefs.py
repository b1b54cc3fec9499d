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


def _fold(times: torch.Tensor):
    """An adapter's affine coefficients at the two times (fa, fb [2, B]): from_x0's on VPSDE."""
    fa, fb = sf.adapters.from_x0(lambda x, t: x, sf.sde.VPSDE()).affine_coefs(times)
    return fa.contiguous(), fb.contiguous()


def _exact(h: float, t: list, a: list, b: list, fa: list | None = None, fb: list | None = None) -> list[float]:
    """The table's column for one sample, each product and sum rounded once to float64 (Fractions)."""
    r = lambda v: float(v)  # noqa: E731  (one rounding)
    sh = h**0.5  # IEEE sqrt is correctly rounded, as Python's
    g0, g1 = r(Fraction((-b[0]) ** 0.5) * Fraction(sh)), r(Fraction((-b[1]) ** 0.5) * Fraction(sh))
    if fa is not None:  # the fold: a + b fa and b fb, each product and sum rounded once; g keeps b
        a = [r(Fraction(a[k]) + Fraction(r(Fraction(b[k]) * Fraction(fa[k])))) for k in (0, 1)]
        b = [r(Fraction(b[k]) * Fraction(fb[k])) for k in (0, 1)]
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
@pytest.mark.parametrize("folded", [False, True])
def test_sde_coefs_matches_exact_arithmetic_and_its_reference(backend, dtype, folded):
    h, times, a, b = _problem(64, 1)
    fold = _fold(times) if folded else (None, None)
    got = mod.sde_coefs(h, times, a, b, *fold, dtype=dtype, backend=backend)
    assert got.shape == (10, 64) and got.dtype == dtype
    cols = [[v[:, i].tolist() if v is not None else None for v in (times, a, b, *fold)] for i in range(64)]
    want = torch.tensor([_exact(h[i].item(), *c) for i, c in enumerate(cols)], dtype=torch.float64).T.to(dtype)
    assert torch.equal(got, want)
    ref = torch.empty(10, 64, dtype=dtype)
    mod.sde_coefs_ref(ref, h, times, a, b, *fold)
    assert torch.equal(got, ref)


def test_the_fold_is_the_drift_of_the_formed_score():
    """Folded rows equal the unfolded rows of the drift a x + b (a' x + b' out) regrouped, in float64
    maths; the noise rows are the SDE's own (a fold that took g from b b' would fail)."""
    h, times, a, b = _problem(32, 4)
    fa, fb = _fold(times)
    got = mod.sde_coefs(h, times, a, b, fa, fb, dtype=torch.float64, backend="torch")
    plain = mod.sde_coefs(h, times, a, b, dtype=torch.float64, backend="torch")
    # x coefficient: the plain x row plus the plain score row times a'; out coefficient: score row times b'
    for x_row, s_row, k in ((0, 1, 0), (3, 4, 0), (5, 6, 1)):
        one = 1.0 if x_row in (0, 3) else 0.0
        want = (plain[x_row] - one) + plain[s_row] * fa[k]  # (1 -) h (a + b a'), its 1 - x cancelling
        torch.testing.assert_close(got[x_row] - one, want, rtol=1e-10, atol=1e-300)
        torch.testing.assert_close(got[s_row], plain[s_row] * fb[k], rtol=1e-13, atol=1e-300)
    assert torch.equal(got[[2, 7, 8, 9]], plain[[2, 7, 8, 9]])


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
    fa, fb = _fold(times)
    for fold in ((), (fa, fb)):
        big = mod.sde_coefs(h, times, a, b, *fold, backend=backend)
        for lo, hi in ((0, 1), (1, 8), (500, 1000)):
            part = [v[..., lo:hi].contiguous() for v in (h, times, a, b, *fold)]
            assert torch.equal(mod.sde_coefs(*part, backend=backend), big[:, lo:hi])


@pytest.mark.parametrize("folded", [False, True])
def test_sde_coefs_passes_opcheck(folded):
    h, times, a, b = _problem(6)
    fold = _fold(times) if folded else (None, None)
    torch.library.opcheck(mod.sde_coefs_op, (h, times, a, b, *fold, torch.float32, "torch"))


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
    fa, fb = _fold(times)
    with pytest.raises(ValueError, match="fa, fb"):
        mod.sde_coefs(h, times, a, b, fa)
    with pytest.raises(ValueError, match="fb:"):
        mod.sde_coefs(h, times, a, b, fa, fb[:, :2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("folded", [False, True])
def test_sde_coefs_of_an_empty_batch_is_empty(backend, dtype, folded):
    """B = 0 (an empty table, whose data pointer is null) in either table dtype."""
    h, times, a, b = _problem(0)
    fold = _fold(times) if folded else (None, None)
    got = mod.sde_coefs(h, times, a, b, *fold, dtype=dtype, backend=backend)
    assert got.shape == (10, 0) and got.dtype == dtype
