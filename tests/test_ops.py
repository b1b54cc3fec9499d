"""Fused ops on every backend against the float64 torch reference, with odd sizes and dtypes."""

from __future__ import annotations

import pytest
import torch

import scorefast as sf
from tests.conftest import INTERPRETED, backend_params

BACKENDS = backend_params()
COMPILED = backend_params(include_torch=False)
SIZES = [(1, 1), (3, 3), (7, 1001), (2, 3, 5, 7)] + ([] if INTERPRETED else [(1, 1_000_003)])
if INTERPRETED:
    SIZES.append((1, 100_003))  # the one odd large case allowed under the interpreter


def _data(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _ref_update(x, terms, noise, x_coef, seed, step, stream=0, ids=None):
    """float64 reference of fused_update via the torch backend."""
    t64 = [(c.double() if isinstance(c, torch.Tensor) else c, t.double()) for c, t in terms]
    nz = noise.double() if isinstance(noise, torch.Tensor) else noise
    xc = x_coef.double() if isinstance(x_coef, torch.Tensor) else x_coef
    return sf.ops.fused_update(
        x.double(), t64, noise=nz, x_coef=xc, seed=seed, step=step, stream=stream, sample_ids=ids, backend="torch"
    )


def _fp32_eager(x, terms, noise, x_coef, seed, step):
    """The same update in fp32 eager torch (exact-rounded fp32 noise): the error budget of fp32."""
    z = sf.randn(x.shape, seed=seed, step=step, dtype=torch.float64, backend="torch").float()

    def col(c):
        return c.float().reshape(-1, *[1] * (x.dim() - 1)) if isinstance(c, torch.Tensor) else c

    out = col(x_coef) * x.float()
    for c, t in terms:
        out = out + col(c) * t.float()
    return out + col(noise) * z


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SIZES, ids=str)
@pytest.mark.parametrize(
    "term_dtype,atol,rtol",
    [
        pytest.param(torch.float32, 2e-6, 2e-6, id="fp32"),
        pytest.param(torch.bfloat16, 2e-6, 2e-6, id="bf16-terms"),
        pytest.param(torch.float16, 2e-6, 2e-6, id="fp16-terms"),
    ],
)
def test_fused_update_matches_reference(backend, shape, term_dtype, atol, rtol):
    B = shape[0]
    x = _data(shape, 1)
    s = _data(shape, 2, term_dtype)
    d = _data(shape, 3, term_dtype)
    per_sample = torch.linspace(0.5, 1.5, B)
    terms = [(per_sample, s), (-0.25, d)]
    got = sf.ops.fused_update(x, terms, noise=0.3, x_coef=0.9, seed=21, step=4, backend=backend)
    ref = _ref_update(x, terms, 0.3, 0.9, 21, 4)
    eager = _fp32_eager(x, terms, 0.3, 0.9, 21, 4)
    assert got.dtype == torch.float32 and got.shape == x.shape
    err = (got.double() - ref).abs().max().item()
    eager_err = (eager.double() - ref).abs().max().item()
    # flash-attention's rule: at most 2x the same-dtype torch error, plus the fp32 transcendentals
    # of the in-kernel Box-Muller (z within 1e-5 * 0.3 here).
    assert err <= 2 * eager_err + 0.3 * 1e-5 + atol, (err, eager_err)
    torch.testing.assert_close(got.double(), ref, atol=atol + 3e-6, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype,atol,rtol",
    [pytest.param(torch.bfloat16, 1e-2, 1.6e-2, id="bf16"), pytest.param(torch.float16, 1e-3, 2e-3, id="fp16")],
)
def test_fused_update_low_precision_state(backend, dtype, atol, rtol):
    x = _data((5, 333), 1, dtype)
    s = _data((5, 333), 2, dtype)
    got = sf.ops.fused_update(x, [(0.5, s)], noise=0.2, seed=1, step=2, backend=backend)
    ref = _ref_update(x, [(0.5, s)], 0.2, 1.0, 1, 2)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_update_noncontiguous_and_channels_last(backend):
    x = _data((2, 3, 8, 5), 1).to(memory_format=torch.channels_last)
    s = _data((2, 5, 8, 3), 2).permute(0, 3, 2, 1)
    got = sf.ops.fused_update(x, [(0.5, s)], noise=0.1, seed=3, step=1, backend=backend)
    ref = _ref_update(x.contiguous(), [(0.5, s.contiguous())], 0.1, 1.0, 3, 1)
    torch.testing.assert_close(got.double(), ref, atol=5e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_variant_and_in_place(backend):
    x = _data((4, 50), 1)
    s = _data((4, 50), 2)
    expected = sf.ops.fused_update(x, [(0.5, s)], noise=0.1, seed=3, step=1, backend=backend)
    out = torch.empty_like(x)
    assert sf.ops.fused_update(x, [(0.5, s)], noise=0.1, seed=3, step=1, out=out, backend=backend) is out
    assert torch.equal(out, expected)
    y = x.clone()
    sf.ops.fused_update(y, [(0.5, s)], noise=0.1, seed=3, step=1, out=y, backend=backend)
    assert torch.equal(y, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_langevin_and_em_steps(backend):
    x, s = _data((6, 77), 1), _data((6, 77), 2)
    eps = torch.linspace(0.01, 0.1, 6)
    got = sf.ops.langevin_step(x, s, eps, seed=5, step=9, backend=backend)
    ref = _ref_update(x, [(eps, s)], torch.sqrt(2 * eps), 1.0, 5, 9)
    torch.testing.assert_close(got.double(), ref, atol=5e-6, rtol=1e-6)
    g = torch.linspace(1.0, 3.0, 6)
    got = sf.ops.euler_maruyama_step(x, s, g, -0.01, seed=5, step=9, backend=backend)
    ref = _ref_update(x, [(-0.01, s)], g * 0.1, 1.0, 5, 9)
    torch.testing.assert_close(got.double(), ref, atol=5e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["sample", "batch"])
def test_snr_langevin_step(backend, norm):
    x, s = _data((5, 999), 1), _data((5, 999), 2)
    s[2] = 0  # zero-score guard: eps = 0, not NaN
    got, eps = sf.ops.snr_langevin_step(x, s, 0.16, alpha=0.9, norm=norm, seed=2, step=3, backend=backend)
    # float64 reference written out: norms of score and of the stream's z
    z = sf.randn(x.shape, seed=2, step=3, dtype=torch.float64, backend="torch")
    gn, zn = s.double().norm(dim=1), z.norm(dim=1)
    if norm == "batch":
        gn, zn = gn.mean().expand(5), zn.mean().expand(5)
    eps_ref = torch.where(gn > 0, 2 * 0.9 * (0.16 * zn / gn) ** 2, 0.0)
    torch.testing.assert_close(eps.double(), eps_ref, atol=0, rtol=2e-6)
    if norm == "sample":
        assert eps[2] == 0 and torch.equal(got[2], x[2])
    ref = x.double() + eps_ref[:, None] * s.double() + torch.sqrt(2 * eps_ref)[:, None] * z
    torch.testing.assert_close(got.double(), ref, atol=5e-6, rtol=2e-6)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_norms_and_sample_norm(backend):
    x, s = _data((3, 4099), 1), _data((3, 4099), 2)
    _out, tn, zn = sf.ops.fused_update(x, [(0.1, s)], noise=1.0, seed=8, step=0, return_norms=True, backend=backend)
    z = sf.randn(x.shape, seed=8, dtype=torch.float64, backend="torch")
    torch.testing.assert_close(tn.double(), s.double().norm(dim=1), atol=0, rtol=2e-6)
    torch.testing.assert_close(zn.double(), z.norm(dim=1), atol=0, rtol=2e-6)
    torch.testing.assert_close(
        sf.ops.sample_norm(s, backend=backend).double(), s.double().norm(dim=1), atol=0, rtol=2e-6
    )


def _invariance_inputs(ids, D):
    """x and score of each sample are functions of its id only (an elementwise, batch-invariant score)."""
    x = sf.randn((len(ids), D), seed=100, sample_ids=torch.tensor(ids))
    s = -x * 0.7 + 0.1
    return x, s


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [3, 1031])
def test_ops_batch_invariance_bitwise(backend, D):
    ids_big = list(range(1000))
    picks = [[640], [3, 999, 0, 640, 17, 250, 8]]
    xb, sb = _invariance_inputs(ids_big, D)
    eps_b = 0.01 + 0.001 * torch.arange(1000.0)

    def run(x, s, eps, ids):
        ids = torch.tensor(ids)
        a = sf.ops.fused_update(x, [(eps, s)], noise=eps.sqrt(), seed=1, step=2, sample_ids=ids, backend=backend)
        b, e = sf.ops.snr_langevin_step(x, s, 0.16, seed=1, step=2, sample_ids=ids, backend=backend)
        return a, b, e, sf.ops.sample_norm(s, backend=backend)

    big = run(xb, sb, eps_b, ids_big)
    for ids in picks:
        x, s = _invariance_inputs(ids, D)
        small = run(x, s, eps_b[ids], ids)
        for got, full in zip(small, big):
            assert torch.equal(got, full[ids])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [1, 2, 3, 13, 63])
def test_short_rows_give_the_long_row_values_bitwise(backend, D):
    """The cpu kernel packs short rows into flat spans: an element's value must not depend on that.
    Noise of element e does not depend on D, so [B, D] must equal the first D columns of [B, 67]."""
    g = torch.Generator().manual_seed(D)
    wide = [torch.randn(37, 67, generator=g) for _ in range(3)]
    ids = torch.arange(100, 137)
    coefs = torch.rand(37, generator=g)

    def update(x, s, d):
        return sf.ops.fused_update(
            x, [(coefs, s), (0.3, d)], x_coef=0.9, noise=coefs * 0.5, seed=5, step=2, sample_ids=ids, backend=backend
        )

    narrow = [w[:, :D].contiguous() for w in wide]
    assert torch.equal(update(*narrow), update(*wide)[:, :D])


def test_thread_count_does_not_change_results():
    pytest.importorskip("scorefast._C_default")
    x, s = _invariance_inputs(list(range(64)), 5000)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(sf.ops.snr_langevin_step(x, s, 0.16, seed=1, step=2, backend="cpu"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.skipif(INTERPRETED, reason="ISA builds are a cpu-backend matter")
@pytest.mark.parametrize("module", ["_C_default", "_C_avx2", "_C_avx512"])
def test_every_isa_build_agrees(module):
    import importlib

    from scorefast.backends.cpu_backend import runnable_isas

    if module[3:] not in runnable_isas():  # checked before the import: a higher ISA dies with SIGILL
        pytest.skip(f"this CPU cannot run {module} (capability {runnable_isas()[0]})")
    m = pytest.importorskip(f"scorefast.{module}")
    importlib.import_module("scorefast._C_default")
    out = torch.empty(3, 1001)
    m.fill_noise(out, torch.tensor([0, 5, 2**32 - 1]), 77, 1, 0, 0, 1)
    ref = sf.randn(
        (3, 1001), seed=77, step=1, sample_ids=torch.tensor([0, 5, 2**32 - 1]), dtype=torch.float64, backend="torch"
    )
    assert (out.double() - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_flow_to_x_terms_and_coefficients(backend):
    x = _data((3, 10), 1).requires_grad_()
    s = _data((3, 10), 2).requires_grad_()
    c = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    n = torch.tensor(0.3, requires_grad=True)
    out = sf.ops.fused_update(x, [(c, s)], noise=n, x_coef=0.9, seed=4, step=1, backend=backend)
    w = _data((3, 10), 5)
    (out * w).sum().backward()
    z = sf.randn((3, 10), seed=4, step=1, dtype=torch.float64, backend="torch")
    torch.testing.assert_close(x.grad.double(), 0.9 * w.double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s.grad.double(), c.detach().double()[:, None] * w.double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(c.grad.double(), (w.double() * s.detach().double()).sum(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(n.grad.double(), (w.double() * z).sum(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 5), (6, 1), (37, 3), (5, 1001)], ids=str)
def test_shared_coefficient_column_equals_per_sample_matrix_bitwise(backend, shape):
    """Coefficients shared by the batch travel as one [K, 1] column; a [B] tensor of the same
    values makes the full [K, B] matrix.  Every kernel must read both to the same bits."""
    from scorefast.ops._common import coef_matrix

    B = shape[0]
    x, s, d = _data(shape, 1), _data(shape, 2), _data(shape, 3, torch.bfloat16)

    def update(c_s, c_d, noise, x_coef):
        return sf.ops.fused_update(x, [(c_s, s), (c_d, d)], noise=noise, x_coef=x_coef, seed=5, step=2, backend=backend)

    values = (0.7, -0.25, 0.3, 0.9)
    shared = update(*values)
    zero_d = update(*(torch.tensor(v) for v in values))
    per_sample = update(*(torch.full((B,), v) for v in values))
    assert torch.equal(shared, per_sample) and torch.equal(zero_d, per_sample)
    cpu = torch.device("cpu")
    assert coef_matrix(values, B, cpu, torch.float32).shape == (4, 1)
    assert coef_matrix([torch.tensor(0.7), 0.3], B, cpu, torch.float32).shape == (2, 1)
    assert coef_matrix([torch.full((B,), 0.7), 0.3], B, cpu, torch.float32).shape == (2, B)


@pytest.mark.parametrize("shape", [(1, 1), (64, 2), (5, 3, 7), (3, 1001)], ids=str)
@pytest.mark.parametrize("term_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_samplers_host_number_path_equals_the_op_bitwise(shape, term_dtype, monkeypatch):
    """Samplers' eager CPU updates hand their host-number coefficients to the kernel directly; the
    result must be the op's (coefficient tensor) to the bit, with coefficients fp32 cannot hold."""
    pytest.importorskip("scorefast._C_default")
    from scorefast.ops.fused_update import apply

    module = sf.backends.get("cpu").load()
    calls = []
    real = module.fused_update_scalars
    monkeypatch.setattr(module, "fused_update_scalars", lambda *a: calls.append(1) or real(*a))
    x, s, d = _data(shape, 1), _data(shape, 2, term_dtype), _data(shape, 3)
    ids = torch.arange(7, 7 + shape[0])
    coefs = dict(x_coef=1 / 3, noise=0.1)
    terms = [(2 / 7, s), (-1e-3 / 3, d)]
    fast = apply(
        x, terms, seed=2**63 + 9, step=5, stream=0, sample_ids=ids, out=None, backend="cpu", trusted=True, **coefs
    )
    op = sf.ops.fused_update(x, terms, seed=2**63 + 9, step=5, sample_ids=ids, backend="cpu", **coefs)
    assert calls == [1] and torch.equal(fast, op)
    noiseless = apply(
        x, terms, seed=1, step=0, stream=0, sample_ids=ids, out=None, backend="cpu", trusted=True, x_coef=0.9, noise=0.0
    )
    assert torch.equal(noiseless, sf.ops.fused_update(x, terms, x_coef=0.9, seed=1, sample_ids=ids, backend="cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_of_shared_coefficients(backend):
    """0-d coefficients (one [K, 1] column): their gradients sum over the batch."""
    x = _data((3, 10), 1).requires_grad_()
    s = _data((3, 10), 2).requires_grad_()
    c = torch.tensor(0.5, requires_grad=True)
    n = torch.tensor(0.3, requires_grad=True)
    out = sf.ops.fused_update(x, [(c, s)], noise=n, x_coef=0.9, seed=4, step=1, backend=backend)
    w = _data((3, 10), 5)
    (out * w).sum().backward()
    z = sf.randn((3, 10), seed=4, step=1, dtype=torch.float64, backend="torch")
    assert c.grad.shape == () and n.grad.shape == ()
    torch.testing.assert_close(x.grad.double(), 0.9 * w.double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s.grad.double(), 0.5 * w.double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(c.grad.double(), (w.double() * s.detach().double()).sum(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(n.grad.double(), (w.double() * z).sum(), atol=1e-4, rtol=1e-5)


def test_float64_gradcheck_on_reference():
    x = _data((2, 6), 1, torch.float64).requires_grad_()
    s = _data((2, 6), 2, torch.float64).requires_grad_()
    c = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)

    def f(x, s, c):
        return sf.ops.fused_update(x, [(c, s)], noise=0.5, seed=1, step=0, backend="torch")

    assert torch.autograd.gradcheck(f, (x, s, c))
    shared = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, s, shared))
    assert torch.autograd.gradcheck(lambda s: sf.ops.snr_langevin_step(x.detach(), s, 0.2, seed=1, step=0)[0], (s,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_refuses_grad(backend):
    x = _data((2, 4), 1).requires_grad_()
    with pytest.raises(ValueError, match="require grad"):
        sf.ops.fused_update(x, [(1.0, x)], out=torch.empty(2, 4), backend=backend)


@pytest.mark.parametrize("backend", COMPILED)
def test_batches_beyond_the_grid_row_limit(backend):
    """A CUDA grid has at most 65535 rows (gridDim.y): samples past that must still be computed,
    and computed like the first ones (the cuda kernels stride their block rows over the batch)."""
    B, D = 65535 + 9, 5
    ids = torch.arange(B)
    x, s = _data((B, D), 1), _data((B, D), 2)
    z64 = sf.randn((B, D), seed=6, step=1, dtype=torch.float64, backend="torch")
    z = sf.randn((B, D), seed=6, step=1, backend=backend)
    assert (z.double() - z64).abs().max().item() <= 1e-5
    got, s_norm, z_norm = sf.ops.fused_update(
        x, [(0.5, s)], noise=0.3, x_coef=0.9, seed=6, step=1, sample_ids=ids, return_norms=True, backend=backend
    )
    ref = 0.9 * x.double() + 0.5 * s.double() + 0.3 * z64
    torch.testing.assert_close(got.double(), ref, atol=5e-6, rtol=2e-6)
    torch.testing.assert_close(s_norm.double(), s.double().norm(dim=1), atol=0, rtol=2e-6)
    torch.testing.assert_close(z_norm.double(), z64.norm(dim=1), atol=0, rtol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    """Samples with no elements: norms are 0 (a kernel grid must not be empty), updates are empty."""
    x = torch.empty(3, 0)
    assert torch.equal(sf.ops.sample_norm(x, backend=backend), torch.zeros(3))
    out, s_norm, z_norm = sf.ops.fused_update(
        x, [(0.5, x)], noise=1.0, seed=1, step=0, return_norms=True, backend=backend
    )
    assert out.shape == (3, 0) and torch.equal(s_norm, torch.zeros(3)) and torch.equal(z_norm, torch.zeros(3))
    assert sf.randn((3, 0), seed=1, backend=backend).shape == (3, 0)
