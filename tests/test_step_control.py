"""The adaptive solvers' per-attempt ops: ``scorefast::step_control``, ``scaled_sumsq`` and
``select_rows`` against their readable references on every backend, batch invariance (B = 1, 7,
1000, bitwise), opcheck and argument errors (issue 19 item 1: an rk45 attempt within its glue budget)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from conftest import backend_params

from scorefast.ops import scaled_sumsq as ss_mod
from scorefast.ops import select_rows as sel_mod
from scorefast.ops import step_control as sc_mod
from scorefast.ops.sample_norm import sample_sumsq
from scorefast.solvers import rk45 as rk45_solver

BACKENDS = backend_params()
RULES = {  # the solvers' own constants
    "rk45": dict(rule="rk45", safety=rk45_solver.SAFETY, exponent=0.2, e_min_grow=(0.9 / 10) ** 5,
                 e_min_retry=0.9**5, e_max=(0.9 / 0.2) ** 5),
    "sde": dict(rule="sde", safety=0.9, exponent=0.9),
}  # fmt: skip
C_STAGE = torch.tensor(rk45_solver.C, dtype=torch.float64)


def _problem(B: int, seed: int = 0, R: int = 5):
    """A controller state with every case: active and done samples, retries, errors around 1, NaN."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    state = torch.zeros(len(sc_mod.ROWS), B, dtype=torch.float64)
    state[sc_mod.R] = torch.where(u(B) < 0.2, 0.0, u(B))
    state[sc_mod.H] = u(B) * 0.3
    state[sc_mod.STEPS] = torch.randint(0, 9, (B,), generator=g).double()
    state[sc_mod.RETRY] = (u(B) < 0.3).double()
    state[sc_mod.FAIL] = torch.where(u(B) < 0.1, 3.0, -1.0)
    state[sc_mod.T] = u(B)
    state[sc_mod.ACTIVE] = (state[sc_mod.R] > 0).double()
    numel = 12
    sumsq = (u(B) * 2.0) ** 2 * numel
    sumsq[u(B) < 0.05] = math.nan
    tiny = u(B) < 0.05
    sumsq[tiny] = 0.0  # err below adaptive_sde's floor 1e-10, with room (r) to grow the step
    state[sc_mod.R] = torch.where(tiny, 1e12, state[sc_mod.R])
    state[sc_mod.ACTIVE] = (state[sc_mod.R] > 0).double()
    sumsq = sumsq.float()
    direction = torch.where(u(B) < 0.5, -1.0, 1.0).double()
    t_end = u(B)
    base, mult = u(R), u(R) - 0.5
    return state, sumsq, t_end, direction, base, mult, numel


def _fma(a: float, b: float, c: float) -> float:
    return float(Fraction(a) * Fraction(b) + Fraction(c))


def _run(backend, B, seed=0, rule="rk45", advance=True, batch_norm=False, table_dtype=torch.float32):
    state, sumsq, t_end, direction, base, mult, numel = _problem(B, seed)
    stage_t = torch.empty(7, B, dtype=torch.float64)
    table = torch.empty(base.shape[0], B, dtype=table_dtype)
    n = torch.tensor(4)
    accept = sc_mod.step_control(state, sumsq if advance else None, t_end, direction, n, C_STAGE, stage_t, base,
                                 mult, table, numel=numel, batch_norm=batch_norm, advance=advance, backend=backend,
                                 **RULES[rule])  # fmt: skip
    return accept, state, stage_t, table


def _ref(B, seed=0, rule="rk45", advance=True, batch_norm=False, table_dtype=torch.float32):
    return _run("torch", B, seed, rule, advance, batch_norm, table_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["rk45", "sde"])
@pytest.mark.parametrize("advance", [True, False])
def test_step_control_matches_its_reference(backend, rule, advance):
    got, want = _run(backend, 300, 1, rule, advance), _ref(300, 1, rule, advance)
    assert torch.equal(got[0], want[0])  # accept
    # the step rule's h E^-p is a float64 pow: the C++ kernel's is glibc's std::pow (< 1 ulp), torch's
    # (the reference) is Sleef's 1-ulp vector pow on AVX2/AVX-512 CPUs, the emulated CUDA kernel's is
    # the host's (glibc's, as the C++ kernel's; on a GPU CUDA's pow, test_cuda), and triton's is
    # exp(log(x) p): what follows from h (h, t, the stage times and table) agrees within those roundings
    rtol = {"triton": 1e-14, "cpu": 1e-15, "cuda": 1e-15}.get(backend, 0.0)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=0, equal_nan=True)


def test_step_control_reference_arithmetic():
    """The reference is the solvers' rule, written out by hand for one sample of each case."""
    accept, state, stage_t, table = _ref(300, 2)
    s0, sumsq, t_end, direction, base, mult, numel = _problem(300, 2)
    for b in range(300):
        err = math.sqrt(float(sumsq[b]) / numel)
        on = bool(s0[sc_mod.ACTIVE, b])
        ok = on and err <= 1.0
        assert bool(accept[b]) == ok
        down = on and not ok
        lo = 0.9**5 if (s0[sc_mod.RETRY, b] != 0 or down) else (0.9 / 10) ** 5
        lo = float(torch.tensor(lo, dtype=torch.float32))  # the floors are float32 numbers (as before)
        h = float(s0[sc_mod.H, b]) * (0.9 * math.pow(min(max(err, lo), (0.9 / 0.2) ** 5), -0.2))
        r = float(s0[sc_mod.R, b]) - float(s0[sc_mod.H, b]) if ok else float(s0[sc_mod.R, b])
        assert float(state[sc_mod.R, b]) == r
        if math.isnan(err):
            assert math.isnan(state[sc_mod.H, b]) and state[sc_mod.FAIL, b] == (3.0 if s0[sc_mod.FAIL, b] >= 0 else 4.0)
            continue
        assert float(state[sc_mod.H, b]) == min(h, r)
        assert state[sc_mod.STEPS, b] == s0[sc_mod.STEPS, b] + ok and state[sc_mod.RETRY, b] == down
        assert float(state[sc_mod.T, b]) == float(t_end[b]) - float(direction[b]) * r
        hs = min(h, r) * float(direction[b])
        assert float(stage_t[3, b]) == _fma(rk45_solver.C[3], hs, float(state[sc_mod.T, b]))  # addcmul rounds once
        assert float(table[2, b]) == float(torch.tensor(_fma(float(mult[2]), hs, float(base[2]))).float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["rk45", "sde"])
def test_step_control_is_batch_invariant(backend, rule):
    big = _run(backend, 1000, 3, rule)
    for lo, hi in ((0, 1), (500, 507), (993, 1000)):
        state, sumsq, t_end, direction, base, mult, numel = _problem(1000, 3)
        part = lambda v, lo=lo, hi=hi: v[..., lo:hi].contiguous()  # noqa: E731
        stage_t, table = torch.empty(7, hi - lo, dtype=torch.float64), torch.empty(5, hi - lo)
        st = part(state)
        acc = sc_mod.step_control(st, part(sumsq), part(t_end), part(direction), torch.tensor(4), C_STAGE, stage_t,
                                  base, mult, table, numel=numel, backend=backend, **RULES[rule])  # fmt: skip
        for a, b in zip((acc, st, stage_t, table), big):
            assert torch.equal(a.nan_to_num(7.0), b[..., lo:hi].nan_to_num(7.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["rk45", "sde"])
@pytest.mark.parametrize("D", [3, 1500])
def test_scaled_sumsq_is_the_sumsq_of_the_scaled_rows(backend, mode, D):
    """Bitwise the per-sample sum of squares (``sample_sumsq``, the same backend) of the reference's
    scaled rows; a NaN in one sample stays in that sample."""
    g = torch.Generator().manual_seed(D)
    e, y, y2 = (torch.randn(1000, D, generator=g) for _ in range(3))
    e[5, 1] = math.nan
    got = ss_mod.scaled_sumsq(e, y, y2, rtol=1e-3, atol=1e-2, mode=mode, backend=backend)
    want = sample_sumsq(ss_mod.scaled_rows_ref(e, y, y2, 1e-3, 1e-2, mode), backend=backend)
    assert torch.isnan(got[5]) and torch.isfinite(got[torch.arange(1000) != 5]).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    for lo, hi in ((0, 1), (500, 507)):  # batch invariance
        part = ss_mod.scaled_sumsq(e[lo:hi], y[lo:hi], y2[lo:hi], rtol=1e-3, atol=1e-2, mode=mode, backend=backend)
        assert torch.equal(part.nan_to_num(7.0), got[lo:hi].nan_to_num(7.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_rows_copies_whole_rows_and_never_reads_a_rejected_nan(backend):
    g = torch.Generator().manual_seed(0)
    news = [torch.randn(1000, 3, 4, generator=g), torch.randn(1000, 5, generator=g).double()]
    olds = [torch.randn(1000, 3, 4, generator=g), torch.randn(1000, 5, generator=g).double()]
    mask = torch.rand(1000, generator=g) < 0.5
    news[0][~mask] = math.nan  # a rejected row's new values may be NaN/inf
    news[1][~mask] = math.inf
    outs = sel_mod.select_rows(mask, news, olds, backend=backend)
    for out, new, old in zip(outs, news, olds):
        assert torch.equal(out, torch.where(mask.view((-1,) + (1,) * (old.dim() - 1)), new, old))
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype,row",
    [
        (torch.float16, (3,)),
        (torch.bfloat16, (1,)),
        (torch.float16, (5, 1)),
        (torch.float32, (3, 3)),
        (torch.float32, (1,)),
        (torch.float64, (1,)),
        (torch.float64, (2, 3)),
        (torch.float32, (0,)),
    ],
)
def test_select_rows_takes_rows_of_any_width_and_dtype(backend, dtype, row):
    """Rows whose bytes are not a multiple of 8 (the CUDA kernel copies in the widest word that
    divides the row and the pointers), of odd widths and of every float size, and empty rows."""
    g = torch.Generator().manual_seed(1)
    B = 37
    new, old = (torch.randn(B, *row, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(B, generator=g) < 0.5
    out = sel_mod.select_rows(mask, [new], [old], backend=backend)[0]
    assert torch.equal(out, torch.where(mask.view((-1,) + (1,) * len(row)), new, old))
    sub = sel_mod.select_rows(mask[3:], [new[3:]], [old[3:]], backend=backend)[0]  # rows off a 16-byte start
    assert torch.equal(sub, out[3:])


def test_ops_pass_opcheck():
    state, sumsq, t_end, direction, base, mult, numel = _problem(7)
    args = (state, sumsq, t_end, direction, torch.tensor(2), C_STAGE, torch.empty(7, 7, dtype=torch.float64), base,
            mult, torch.empty(5, 7), numel, False, "rk45", 0.9, 0.2, 1e-5, 0.59, 41.0, True, "torch")  # fmt: skip
    torch.library.opcheck(sc_mod.step_control_op, args)
    e, y, y2 = torch.randn(3, 4, 6).unbind(0)
    torch.library.opcheck(ss_mod.scaled_sumsq_op, (e, y, y2, 1e-3, 1e-2, "rk45", "torch"))
    torch.library.opcheck(sel_mod.select_rows_op, (torch.tensor([True, False, True, False]), [e], [y], "torch"))


def test_arguments_are_checked_by_name():
    state, sumsq, t_end, direction, base, mult, numel = _problem(7)
    stage_t, table = torch.empty(7, 7, dtype=torch.float64), torch.empty(5, 7)

    def call(**kw):
        a = dict(state=state, sumsq=sumsq, t_end=t_end, direction=direction, n=torch.tensor(1), c_stage=C_STAGE,
                 stage_t=stage_t, base=base, mult=mult, table=table)  # fmt: skip
        opts = dict(numel=numel)
        for k, v in kw.items():
            (a if k in a else opts)[k] = v
        return sc_mod.step_control(*a.values(), **opts)

    for kw, name in [
        (dict(state=state.float()), "state"),
        (dict(t_end=t_end[:3]), "t_end"),
        (dict(sumsq=sumsq.long()), "sumsq"),
        (dict(table=table.long()), "table"),
        (dict(n=1.5), "n"),
        (dict(numel=0), "numel"),
        (dict(rule="pid"), "rule"),
        (dict(safety=math.nan), "safety"),
    ]:
        with pytest.raises((ValueError, TypeError), match=name):
            call(**kw)
    e = torch.randn(4, 5)
    with pytest.raises(ValueError, match="mode"):
        ss_mod.scaled_sumsq(e, e, e, rtol=1e-3, atol=1e-3, mode="l1")
    with pytest.raises(ValueError, match="y2"):
        ss_mod.scaled_sumsq(e, e, e[:2], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="rtol"):
        ss_mod.scaled_sumsq(e, e, e, rtol=-1.0, atol=1e-3)
    with pytest.raises(TypeError, match="mask"):
        sel_mod.select_rows(torch.ones(4), [e], [e])
    with pytest.raises(TypeError, match="news"):
        sel_mod.select_rows(torch.ones(4, dtype=torch.bool), [e.double()], [e])


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_solvers_eager_loops_run_on_every_backend(backend):
    """The eager loops hand the controller a Python int attempt counter (``Controller.start`` 0, then
    the loop's n): every backend takes it (triton once read it as a tensor and failed at start)."""
    import scorefast as sf

    y0 = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    got = rk45_solver.solve(lambda y, t: -y, y0, 0.0, 1.0, rtol=1e-5, atol=1e-5, backend=backend)
    torch.testing.assert_close(got.y, y0 * math.exp(-1.0), rtol=2e-5, atol=2e-6)
    gm = sf.testing.GaussianMixture.builtin()
    sde = sf.sde.VPSDE()
    x = sf.sample(gm.score_fn(sde), sde, (6, 2), sampler="adaptive_sde", seed=0, backend=backend, rtol=0.2, atol=0.2)
    assert x.shape == (6, 2) and bool(torch.isfinite(x).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("advance", [True, False])
def test_step_control_of_an_empty_batch_is_empty(backend, table_dtype, advance):
    """B = 0 (every table empty, whose data pointer is null): nothing to do, in either table dtype."""
    accept, state, stage_t, table = _run(backend, 0, advance=advance, table_dtype=table_dtype)
    assert accept.shape == (0,) and state.shape == (len(sc_mod.ROWS), 0) and table.dtype == table_dtype
    assert stage_t.shape == (7, 0) and table.shape == (5, 0)
