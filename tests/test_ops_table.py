"""The one-launch step ops: coefficient tables read at a device step counter, the in-kernel Philox
step n*S + j, the non-finite flag, the fused SNR corrector; every backend against float64."""

from __future__ import annotations

import operator

import pytest
import torch

import scorefast as sf
from scorefast.ops.fused_update import fused_update_step_op, fused_update_step_out_op
from scorefast.ops.snr_langevin_step import snr_langevin_step_op, snr_langevin_step_out_op
from tests.conftest import INTERPRETED, backend_params

BACKENDS = backend_params()
SIZES = [(1, 1), (3, 3), (7, 1001), (2, 3, 5, 7)]
LARGE = (1, 100_003) if INTERPRETED else (1, 1_000_003)
DTYPES = [  # (state, terms, atol, rtol): fp32 as tight as fp32 allows, low-precision states by their ulp
    pytest.param(torch.float32, torch.float32, 2e-6, 2e-6, id="fp32"),
    pytest.param(torch.float32, torch.bfloat16, 2e-6, 2e-6, id="fp32-bf16terms"),
    pytest.param(torch.float32, torch.float16, 2e-6, 2e-6, id="fp32-fp16terms"),
    pytest.param(torch.bfloat16, torch.bfloat16, 1e-2, 1.6e-2, id="bf16"),
    pytest.param(torch.float16, torch.float16, 1e-3, 2e-3, id="fp16"),
]
S, J = 3, 2  # draws per step and the draw of these calls: Philox step n*S + j


def _data(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _table(n_terms: int, N: int = 6, seed: int = 11) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(N, n_terms + 2, generator=g) + 0.25).to(torch.float32)


def _z64(shape, seed, step, ids=None):
    return sf.randn(shape, seed=seed, step=step, sample_ids=ids, dtype=torch.float64, backend="torch")


def _ref(x, terms, table, n, seed, with_noise=True, ids=None):
    """float64 reference of fused_update_table, written out (the torch backend is not used)."""
    c = table[n].double()
    acc = c[0] * x.double()
    for k, t in enumerate(terms):
        acc = acc + c[1 + k] * t.double()
    if with_noise:
        acc = acc + c[-1] * _z64(x.shape, seed, n * S + J, ids)
    return acc


def _flag():
    return torch.tensor(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SIZES, ids=str)
@pytest.mark.parametrize("dtype,term_dtype,atol,rtol", DTYPES)
def test_fused_update_table_matches_float64(backend, shape, dtype, term_dtype, atol, rtol):
    x = _data(shape, 1, dtype)
    terms = [_data(shape, 2, term_dtype), _data(shape, 3, term_dtype)]
    table, flag = _table(2), _flag()
    for n in (0, 4):  # two rows of one table: the row is read from the device counter each call
        got = sf.ops.fused_update_table(
            x, terms, table, torch.tensor(n), seed=21, draws=S, draw=J, flag=flag, backend=backend
        )
        assert got.dtype == dtype and got.shape == x.shape
        ref = _ref(x, terms, table, n, 21)
        noise_err = table[n, -1].item() * 1e-5  # the in-kernel Box-Muller's fp32 transcendentals
        torch.testing.assert_close(got.double(), ref, atol=atol + noise_err, rtol=rtol)
    assert flag.item() == -1


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_update_table_large_odd_row(backend):
    x, s = _data(LARGE, 1), _data(LARGE, 2, torch.bfloat16)
    table = _table(1)
    got = sf.ops.fused_update_table(x, [s], table, torch.tensor(5), seed=2**63 + 5, draws=S, draw=J, backend=backend)
    torch.testing.assert_close(got.double(), _ref(x, [s], table, 5, 2**63 + 5), atol=2e-6 + 1e-5, rtol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_error_is_within_twice_the_eager_fp32_error(backend):
    """flash-attention's rule on the table path: the kernel's error against float64 at most 2x that of
    the same update in eager fp32 torch (with the fp32-rounded normals), plus the noise's 1e-5."""
    x, s, d = _data((7, 1001), 1), _data((7, 1001), 2), _data((7, 1001), 3)
    table = _table(2)
    n = 3
    got = sf.ops.fused_update_table(x, [s, d], table, torch.tensor(n), seed=5, draws=S, draw=J, backend=backend)
    ref = _ref(x, [s, d], table, n, 5)
    c = table[n]
    eager = c[0] * x + c[1] * s + c[2] * d + c[3] * _z64(x.shape, 5, n * S + J).float()
    err = (got.double() - ref).abs().max().item()
    eager_err = (eager.double() - ref).abs().max().item()
    assert err <= 2 * eager_err + c[3].item() * 1e-5, (err, eager_err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 5), (6, 1), (37, 3), (5, 1001), (2, 3, 4, 5)], ids=str)
def test_table_row_equals_the_coefficient_column_bitwise(backend, shape):
    """Row n of a table and the same numbers as a [K, 1] column (fused_update with Python floats, step
    n*S + j) reach the kernel as the same fp32 values: the results must be equal to the bit.  The
    table is a column slice of a wider one (row stride 6, not K), ids are given and omitted."""
    x, s, d = _data(shape, 1), _data(shape, 2), _data(shape, 3, torch.bfloat16)
    wide = _table(4)
    table = wide[:, 1:5]  # [N, 4], stride (6, 1)
    n = 4
    c = [float(v) for v in table[n]]
    column = sf.ops.fused_update(
        x, [(c[1], s), (c[2], d)], x_coef=c[0], noise=c[3], seed=9, step=n * S + J, backend=backend
    )
    for ids in (None, torch.arange(shape[0])):
        row = sf.ops.fused_update_table(
            x, [s, d], table, torch.tensor(n), seed=9, draws=S, draw=J, sample_ids=ids, backend=backend
        )
        assert torch.equal(row, column)


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_noise_false_reads_no_noise(backend):
    x, s = _data((4, 33), 1), _data((4, 33), 2)
    table = _table(1)
    table[:, -1] = float("nan")  # an unread column
    got = sf.ops.fused_update_table(x, [s], table, torch.tensor(1), seed=1, with_noise=False, backend=backend)
    torch.testing.assert_close(got.double(), _ref(x, [s], table, 1, 1, with_noise=False), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_variant_in_place_and_images(backend):
    x, s = _data((2, 3, 5, 7), 1), _data((2, 3, 5, 7), 2)
    table, row = _table(1), torch.tensor(2)
    expected = sf.ops.fused_update_table(x, [s], table, row, seed=3, draws=S, draw=J, backend=backend)
    y = x.clone()
    assert sf.ops.fused_update_table(y, [s], table, row, seed=3, draws=S, draw=J, out=y, backend=backend) is y
    assert torch.equal(y, expected)
    cl = x.to(memory_format=torch.channels_last)  # no [B, D] view: filled through a temporary
    out = torch.empty_like(cl)
    sf.ops.fused_update_table(cl, [s], table, row, seed=3, draws=S, draw=J, out=out, backend=backend)
    assert torch.equal(out, expected)


# -- the non-finite flag ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_flag_records_the_first_bad_step(backend):
    x, s = _data((5, 41), 1), _data((5, 41), 2)
    table, flag = _table(1), _flag()
    for n in range(6):
        score = s.clone()
        if n == 2:
            score[3, 40] = float("nan")  # the last element of a late sample: every element is checked
        if n == 4:
            score[0, 0] = float("inf")
        sf.ops.fused_update_table(
            x, [score], table, torch.tensor(n), seed=1, draws=S, draw=J, flag=flag, backend=backend
        )
        assert flag.item() == (-1 if n < 2 else 2), n  # the first bad step stays recorded


@pytest.mark.parametrize("backend", BACKENDS)
def test_flag_catches_a_finite_score_that_overflows(backend):
    """A score of 3e38 is finite; times a coefficient of 2 the state is not: the output is checked."""
    x = torch.zeros(2, 9)
    s = torch.full((2, 9), 3e38)
    table = torch.tensor([[1.0, 2.0, 0.0]] * 3)
    flag = _flag()
    sf.ops.fused_update_table(x, [s], table, torch.tensor(1), seed=1, flag=flag, backend=backend)
    assert flag.item() == 1
    ok = _flag()
    sf.ops.fused_update_table(x, [s], table * 0.5, torch.tensor(1), seed=1, flag=ok, backend=backend)
    assert ok.item() == -1  # 3e38 itself passes


@pytest.mark.parametrize("backend", BACKENDS)
def test_flag_catches_a_low_precision_state_overflow(backend):
    """fp16 state: 4e4 + 4e4 is finite in fp32 and inf once stored as fp16."""
    x = torch.full((3, 17), 4e4, dtype=torch.float16)
    table = torch.tensor([[1.0, 1.0, 0.0]])
    flag = _flag()
    got = sf.ops.fused_update_table(x, [x], table, torch.tensor(0), seed=1, flag=flag, backend=backend)
    assert torch.isinf(got).all() and flag.item() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_flag_on_the_coefficient_matrix_path_records_step(backend):
    """fused_update(..., flag=) (per-sample [K, B] coefficients, the adaptive solvers' form) records step."""
    x, s = _data((4, 10), 1), _data((4, 10), 2)
    s[2, 5] = float("nan")
    flag = _flag()
    c = torch.linspace(0.1, 0.4, 4)
    got = sf.ops.fused_update(x, [(c, s)], noise=c, seed=1, step=torch.tensor(17), flag=flag, backend=backend)
    ref = sf.ops.fused_update(x, [(c, s)], noise=c, seed=1, step=17, backend=backend)
    assert flag.item() == 17
    torch.testing.assert_close(got, ref, equal_nan=True, atol=0, rtol=0)


# -- the fused SNR corrector ---------------------------------------------------------------------

SNR_D = [1, 2, 3, 13, 300, 2100, 5000, 8192, 8193]  # one thread a sample .. a block, MU 1/2/4, 3 launches


def _snr_ref(x, s, snr, alpha, seed, k, ids=None):
    z = _z64(x.shape, seed, k, ids)
    gn, zn = s.double().reshape(len(s), -1).norm(dim=1), z.reshape(len(s), -1).norm(dim=1)
    eps = torch.where(gn > 0, 2 * alpha * (snr * zn / gn) ** 2, 0.0)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return x.double() + eps.reshape(shape) * s.double() + torch.sqrt(2 * eps).reshape(shape) * z, eps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", SNR_D)
def test_snr_table_matches_float64(backend, D):
    x, s = _data((3, D), 1), _data((3, D), 2)
    s[1] = 0  # zero score: eps = 0, x unchanged
    alphas = torch.tensor([0.9, 0.8, 0.7, 0.95])
    flag = _flag()
    n = 2
    got, eps = sf.ops.snr_langevin_step(
        x, s, 0.16, alpha=alphas, row=torch.tensor(n), draws=S, draw=J, seed=4, flag=flag, backend=backend
    )
    ref, eps_ref = _snr_ref(x, s, 0.16, alphas[n].double(), 4, n * S + J)
    torch.testing.assert_close(eps.double(), eps_ref, atol=0, rtol=3e-6)
    torch.testing.assert_close(got.double(), ref, atol=5e-6, rtol=2e-6)
    assert eps[1] == 0 and torch.equal(got[1], x[1]) and flag.item() == -1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [5, 300, 8193])
def test_snr_table_equals_the_alpha_tensor_path_bitwise(backend, D):
    """alpha from row n of a table, and the same fp32 alpha as a [1] tensor at step n*S + j (the
    public form), give the same bits: the kernels read the row, nothing else changes."""
    x, s = _data((4, D), 1), _data((4, D), 2, torch.bfloat16)
    alphas = torch.tensor([0.9, 0.8, 0.7])
    a, ea = sf.ops.snr_langevin_step(
        x, s, 0.16, alpha=alphas, row=torch.tensor(1), draws=S, draw=J, seed=4, backend=backend
    )
    b, eb = sf.ops.snr_langevin_step(x, s, 0.16, alpha=alphas[1:2].clone(), seed=4, step=S + J, backend=backend)
    assert torch.equal(a, b) and torch.equal(ea, eb)


@pytest.mark.parametrize("backend", BACKENDS)
def test_snr_low_precision_inputs(backend):
    x, s = _data((3, 333), 1, torch.bfloat16), _data((3, 333), 2, torch.float16)
    got, eps = sf.ops.snr_langevin_step(x, s, 0.2, seed=1, step=5, backend=backend)
    ref, eps_ref = _snr_ref(x, s, 0.2, 1.0, 1, 5)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(eps.double(), eps_ref, atol=0, rtol=3e-6)
    torch.testing.assert_close(got.double(), ref, atol=1e-2, rtol=1.6e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [3, 300])
def test_snr_flag(backend, D):
    x, s = _data((3, D), 1), _data((3, D), 2)
    s[2, D - 1] = float("inf")
    flag = _flag()
    sf.ops.snr_langevin_step(x, s, 0.16, row=torch.tensor(7), alpha=torch.ones(9), seed=1, flag=flag, backend=backend)
    assert flag.item() == 7


def _invariance_inputs(ids, D):
    x = sf.randn((len(ids), D), seed=100, sample_ids=torch.tensor(ids))
    return x, -x * 0.7 + 0.1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [3, 37, 97] if INTERPRETED else [3, 37, 300, 1031])
def test_step_ops_batch_invariance_bitwise(backend, D):
    """B = 1, 7 and 1000: a sample's bits do not depend on the batch or its position in it (sub-warp,
    several-rows-a-block and block-per-row shapes of the fused corrector)."""
    ids_big = list(range(1000))
    table = _table(1)
    alphas = torch.tensor([0.5, 0.75, 1.0])

    def run(x, s, ids):
        ids = torch.tensor(ids)
        row = torch.tensor(2)
        a = sf.ops.fused_update_table(x, [s], table, row, seed=1, draws=S, draw=J, sample_ids=ids, backend=backend)
        b, e = sf.ops.snr_langevin_step(
            x, s, 0.16, alpha=alphas, row=row, draws=S, draw=J, seed=1, sample_ids=ids, backend=backend
        )
        return a, b, e

    big = run(*_invariance_inputs(ids_big, D), ids_big)
    for ids in ([640], [3, 999, 0, 640, 17, 250, 8]):
        for got, full in zip(run(*_invariance_inputs(ids, D), ids), big):
            assert torch.equal(got, full[ids])


# -- schemas, tracing, errors --------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_step_ops(backend):
    x, s = torch.randn(3, 10), torch.randn(3, 10)
    seed, row = torch.tensor(7), torch.tensor(2)
    ids = torch.arange(3)
    table = _table(1)
    for args in (
        (x, [s], table, row, seed, row, S, J, 0, None, _flag(), True, backend),
        (x, [s], torch.rand(3, 3), None, seed, torch.tensor(4), 1, 0, 0, ids, None, True, backend),
    ):
        torch.library.opcheck(fused_update_step_op, args)
        torch.library.opcheck(fused_update_step_out_op, (torch.empty(3, 10), *args))
    for args in (
        (x, s, torch.rand(5), row, 0.05, seed, row, S, J, 0, None, _flag(), backend),
        (x, s, None, None, 0.05, seed, torch.tensor(4), 1, 0, 0, ids, None, backend),
    ):
        torch.library.opcheck(snr_langevin_step_op, args)
        torch.library.opcheck(snr_langevin_step_out_op, (torch.empty(3, 10), *args))


def _traced_nodes(fn, *args):
    from torch.fx.experimental.proxy_tensor import make_fx

    from scorefast import graphs

    with graphs._capturing("fx"):
        gm = make_fx(fn)(*args)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert all(isinstance(t, torch._ops.OpOverload) or t is operator.getitem for t in calls), calls
    return [t for t in calls if t is not operator.getitem]  # tuple unpacking is no op


@pytest.mark.parametrize("trusted", [False, True], ids=["public", "trusted"])
def test_a_table_step_traces_to_one_node(trusted):
    """What a captured step replays: the table read, the Philox step, the sample ids and the finite
    check all happen inside one scorefast op, with no aten op beside it (DESIGN.md's glue ops)."""
    x, s = torch.randn(6, 9), torch.randn(6, 9)
    table, alphas = _table(1), torch.rand(8)
    backend = "cpu" if trusted else None
    kw = dict(draws=S, draw=J, backend=backend, _trusted=trusted)

    def update(x, s, table, row, seed, flag):
        return sf.ops.fused_update_table(x, [s], table, row, seed=seed, flag=flag, **kw)

    def corrector(x, s, alphas, row, seed, flag):
        return sf.ops.snr_langevin_step(x, s, 0.16, alpha=alphas, row=row, seed=seed, flag=flag, **kw)

    row, seed, flag = torch.tensor(3), torch.tensor(5), _flag()
    assert _traced_nodes(update, x, s, table, row, seed, flag) == [torch.ops.scorefast.fused_update_step.default]
    assert _traced_nodes(corrector, x, s, alphas, row, seed, flag) == [torch.ops.scorefast.snr_langevin_step.default]


def test_traced_table_step_replays_with_the_new_row():
    """The traced call reads the counter at replay: advancing it in place changes the coefficients
    and the noise exactly as an eager call at that row."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from scorefast import graphs

    x, s, table = torch.randn(4, 13), torch.randn(4, 13), _table(1)
    row, seed, flag = torch.tensor(0), torch.tensor(5), _flag()

    def update(x, s, table, row, seed, flag):
        return sf.ops.fused_update_table(x, [s], table, row, seed=seed, draws=S, draw=J, flag=flag)

    with graphs._capturing("fx"):
        gm = make_fx(update)(x, s, table, row, seed, flag)
    for n in (1, 5):
        row.fill_(n)
        assert torch.equal(gm(x, s, table, row, seed, flag), update(x, s, table, torch.tensor(n), seed, flag))


def test_errors_name_the_argument():
    x, s = torch.randn(3, 4), torch.randn(3, 4)
    table, row = _table(1), torch.tensor(0)
    call = sf.ops.fused_update_table
    with pytest.raises(ValueError, match=r"table: expected shape \[N, 3\]"):
        call(x, [s], _table(2), row, seed=0)
    with pytest.raises(TypeError, match=r"table: expected torch\.float32"):
        call(x, [s], table.double(), row, seed=0)
    with pytest.raises(ValueError, match="table: must be contiguous along its last"):
        call(x, [s], torch.rand(3, 6).T, row, seed=0)
    with pytest.raises(TypeError, match="row: expected a 0-d int64"):
        call(x, [s], table, torch.tensor([0]), seed=0)
    with pytest.raises(TypeError, match="row: expected a 0-d int64"):
        call(x, [s], table, 0, seed=0)
    with pytest.raises(ValueError, match="draws, draw"):
        call(x, [s], table, row, seed=0, draws=2, draw=2)
    with pytest.raises(TypeError, match="flag: expected a 0-d int64"):
        call(x, [s], table, row, seed=0, flag=torch.tensor(-1.0))
    with pytest.raises(ValueError, match="terms: at most 4"):
        call(x, [s] * 5, _table(5), row, seed=0)
    with pytest.raises(ValueError, match=r"terms\[0\]: shape"):
        call(x, [s[:2]], table, row, seed=0)
    with pytest.raises(TypeError, match="alpha: with row"):
        sf.ops.snr_langevin_step(x, s, 0.1, alpha=0.5, row=row, seed=0)
    with pytest.raises(ValueError, match="alpha: with row, expected a table"):
        sf.ops.snr_langevin_step(x, s, 0.1, alpha=torch.ones(2, 2), row=row, seed=0)
    with pytest.raises(TypeError, match="step: required"):
        sf.ops.snr_langevin_step(x, s, 0.1, seed=0)
    with pytest.raises(TypeError, match="flag: expected"):
        sf.ops.fused_update(x, [(0.5, s)], flag=torch.tensor([-1]))


def test_step_ops_refuse_gradients_clearly():
    x, s = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)
    with pytest.raises(ValueError, match="records no gradients"):
        sf.ops.fused_update_table(x, [s], _table(1), torch.tensor(0), seed=0)
    with pytest.raises(ValueError, match="records no gradients"):
        sf.ops.fused_update(x, [(0.5, s)], seed=0, flag=_flag())
    # without a flag the corrector keeps its gradients (the composed op)
    y, _ = sf.ops.snr_langevin_step(x, s, 0.1, seed=0, step=1)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_rows_give_the_aligned_bits(backend, dtype):
    """Tensors that start one element past an allocation (x[1:] of a batch): the CUDA kernels then
    load element by element instead of 16 bytes at a time; every element's value must not change."""

    def shifted(t):
        flat = torch.empty(t.numel() + 1, dtype=t.dtype)[1:]
        return flat.view(t.shape).copy_(t)

    x, s = _data((5, 64), 1, dtype), _data((5, 64), 2, dtype)
    table, row = _table(1), torch.tensor(1)
    aligned = sf.ops.fused_update_table(x, [s], table, row, seed=3, draws=S, draw=J, backend=backend)
    moved = sf.ops.fused_update_table(
        shifted(x), [shifted(s)], table, row, seed=3, draws=S, draw=J, out=shifted(x), backend=backend
    )
    assert torch.equal(moved, aligned)
    a, ea = sf.ops.snr_langevin_step(x, s, 0.16, seed=3, step=1, backend=backend)
    b, eb = sf.ops.snr_langevin_step(shifted(x), shifted(s), 0.16, seed=3, step=1, out=shifted(x), backend=backend)
    assert torch.equal(a, b) and torch.equal(ea, eb)
