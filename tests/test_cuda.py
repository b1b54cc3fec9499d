"""GPU tests (marked cuda; skipped without a GPU): the cuda and triton backends on CUDA tensors."""

from __future__ import annotations

import pytest
import torch

import scorefast as sf
from tests.test_noise_contract import CONTRACT

pytestmark = pytest.mark.cuda
GPU_BACKENDS = ["cuda", "triton"]


@pytest.fixture(params=GPU_BACKENDS)
def backend(request):
    st = sf.backends.state(request.param)
    if not st.available:
        pytest.skip(st.why)
    return request.param


def test_contract_values_on_gpu(backend):
    for row in CONTRACT:
        got = sf.randn(
            (1, row["element"] + 1),
            seed=row["seed"],
            step=row["step"],
            stream=row["stream"],
            sample_ids=torch.tensor([row["sample_id"]], device="cuda"),
            device="cuda",
            backend=backend,
        )
        assert abs(got[0, -1].item() - row["normal"]) <= 1e-5
        u = sf.rand(
            (1, row["element"] + 1),
            seed=row["seed"],
            step=row["step"],
            stream=row["stream"],
            sample_ids=torch.tensor([row["sample_id"]], device="cuda"),
            device="cuda",
            backend=backend,
        )
        assert u[0, -1].item() == row["uniform"]


@pytest.mark.parametrize("shape", [(1, 1), (3, 1001), (2, 3, 33, 17), (1, 20_000_003)], ids=str)
@pytest.mark.parametrize("term_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_update_vs_reference(backend, shape, term_dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=g)
    s = torch.randn(shape, device="cuda", generator=g).to(term_dtype)
    c = torch.linspace(0.5, 1.5, shape[0], device="cuda")
    got = sf.ops.fused_update(x, [(c, s)], noise=0.3, seed=9, step=2, backend=backend)
    ref = sf.ops.fused_update(x.double(), [(c.double(), s.double())], noise=0.3, seed=9, step=2, backend="torch")
    torch.testing.assert_close(got.double(), ref, atol=5e-6, rtol=2e-6)


def test_snr_and_norms_vs_reference(backend):
    x = torch.randn(6, 3 * 32 * 32, device="cuda")
    s = torch.randn_like(x)
    s[1] = 0
    got, eps = sf.ops.snr_langevin_step(x, s, 0.16, seed=1, step=0, backend=backend)
    ref, eps_ref = sf.ops.snr_langevin_step(x.double(), s.double(), 0.16, seed=1, step=0, backend="torch")
    torch.testing.assert_close(eps.double(), eps_ref, atol=0, rtol=5e-6)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=5e-6)
    assert eps[1] == 0


def test_batch_invariance_bitwise_on_gpu(backend):
    D = 1031
    ids = torch.arange(1000, device="cuda")
    x = sf.randn((1000, D), seed=7, sample_ids=ids, device="cuda", backend=backend)
    big = sf.ops.snr_langevin_step(x, -x, 0.16, seed=1, step=2, backend=backend)
    for pick in ([640], [3, 999, 0, 640, 17, 250, 8]):
        p = torch.tensor(pick, device="cuda")
        small = sf.ops.snr_langevin_step(x[p], -x[p], 0.16, seed=1, step=2, sample_ids=p, backend=backend)
        assert torch.equal(small[0], big[0][p]) and torch.equal(small[1], big[1][p])


def test_graph_replay_advances_device_counter(backend):
    """Seed/step as device tensors: a captured launch replays with the new step, bitwise as eager."""
    x = torch.zeros(4, 4099, device="cuda")
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    seed = torch.tensor(5, dtype=torch.int64, device="cuda")
    out = torch.empty_like(x)
    sf.ops.fused_update(x, [], noise=1.0, seed=seed, step=step, out=out, backend=backend)  # warm up / compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sf.ops.fused_update(x, [], noise=1.0, seed=seed, step=step, out=out, backend=backend)
    for k in (3, 11):
        step.fill_(k)
        graph.replay()
        eager = sf.randn(x.shape, seed=5, step=k, device="cuda", backend=backend)
        assert torch.equal(out, eager)


def test_cuda_backend_is_default_for_cuda_tensors():
    if not sf.backends.state("cuda").available:
        pytest.skip(sf.backends.state("cuda").why)
    assert sf.backends.resolve(None, torch.device("cuda")) == "cuda"


def test_sampler_on_gpu_matches_cpu_after_one_step():
    sde = sf.sde.VPSDE()
    gm = sf.testing.GaussianMixture.ring(4, 3.0, 0.4)

    def score(x, t):
        return gm.score(x.cpu(), t.cpu(), sde).to(x.device)

    gpu = sf.sample(score, sde, (64, 2), sampler="euler_maruyama", steps=1, device="cuda", denoise=False)
    cpu = sf.sample(score, sde, (64, 2), sampler="euler_maruyama", steps=1, device="cpu", denoise=False)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)


# -- the one-launch step ops on a GPU --------------------------------------------------------------


def _table_ref(x, terms, table, n, seed, k):
    c = table[n].double()
    acc = c[0] * x.double()
    for i, t in enumerate(terms):
        acc = acc + c[1 + i] * t.double()
    z = sf.randn(x.shape, seed=seed, step=k, dtype=torch.float64, device=x.device, backend="torch")
    return acc + c[-1] * z


@pytest.mark.parametrize("shape", [(1, 1), (3, 1001), (2, 3, 33, 17), (1, 20_000_003)], ids=str)
@pytest.mark.parametrize("term_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_update_table_vs_reference(backend, shape, term_dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=g)
    terms = [torch.randn(shape, device="cuda", generator=g).to(term_dtype) for _ in range(2)]
    table = torch.rand(5, 4, device="cuda") + 0.25
    row, seed, flag = torch.tensor(3, device="cuda"), torch.tensor(9, device="cuda"), torch.tensor(-1, device="cuda")
    got = sf.ops.fused_update_table(x, terms, table, row, seed=seed, draws=3, draw=2, flag=flag, backend=backend)
    torch.testing.assert_close(got.double(), _table_ref(x, terms, table, 3, 9, 11), atol=5e-6 + 1e-5, rtol=2e-6)
    assert flag.item() == -1


@pytest.mark.parametrize("D", [1, 3, 13, 300, 2100, 5000, 8192, 8193, 3 * 64 * 64])
def test_snr_one_kernel_and_large_vs_reference(backend, D):
    x = torch.randn(6, D, device="cuda")
    s = torch.randn_like(x).to(torch.bfloat16)
    s[1] = 0
    alphas = torch.tensor([0.5, 0.9], device="cuda")
    row = torch.tensor(1, device="cuda")
    got, eps = sf.ops.snr_langevin_step(x, s, 0.16, alpha=alphas, row=row, draws=2, draw=1, seed=1, backend=backend)
    ref, eps_ref = sf.ops.snr_langevin_step(
        x.double(), s.double(), 0.16, alpha=alphas.double(), row=row, draws=2, draw=1, seed=1, backend="torch"
    )
    torch.testing.assert_close(eps.double(), eps_ref, atol=0, rtol=5e-6)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=5e-6)
    assert eps[1] == 0 and torch.equal(got[1], x[1])


@pytest.mark.parametrize("D", [3, 37, 300, 1031, 5000])
def test_step_ops_batch_invariance_bitwise_on_gpu(backend, D):
    ids = torch.arange(1000, device="cuda")
    x = sf.randn((1000, D), seed=7, sample_ids=ids, device="cuda", backend=backend)
    table, row = torch.rand(4, 3, device="cuda"), torch.tensor(2, device="cuda")
    alphas = torch.rand(4, device="cuda") + 0.5

    def run(x, ids):
        a = sf.ops.fused_update_table(x, [-x], table, row, seed=1, draws=2, draw=1, sample_ids=ids, backend=backend)
        b = sf.ops.snr_langevin_step(x, -x, 0.16, alpha=alphas, row=row, seed=1, sample_ids=ids, backend=backend)
        return a, *b

    big = run(x, ids)
    for pick in ([640], [3, 999, 0, 640, 17, 250, 8]):
        p = torch.tensor(pick, device="cuda")
        for small, full in zip(run(x[p], p), big):
            assert torch.equal(small, full[p])


def test_graph_replay_of_a_table_step_reads_the_counter_and_sets_the_flag(backend):
    """Captured once; each replay reads the row (coefficients, Philox step) and checks the score."""
    x = torch.randn(4, 4099, device="cuda")
    score = torch.randn_like(x)
    table = torch.rand(6, 3, device="cuda")
    row, seed, flag = (torch.tensor(v, device="cuda") for v in (0, 5, -1))
    out = torch.empty_like(x)

    def step():
        sf.ops.fused_update_table(
            x, [score], table, row, seed=seed, draws=2, draw=1, flag=flag, out=out, backend=backend
        )

    step()  # warm up / compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for n in (2, 5):
        row.fill_(n)
        graph.replay()
        eager = sf.ops.fused_update_table(x, [score], table, torch.tensor(n, device="cuda"), seed=5, draws=2, draw=1)
        assert torch.equal(out, eager)
    assert flag.item() == -1
    score[1, 7] = float("nan")
    row.fill_(4)
    graph.replay()
    assert flag.item() == 4


def test_launches_on_a_second_gpu_run_there():
    """Tensors on cuda:1 while cuda:0 is current: the device guard runs the kernels on cuda:1."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    for backend in GPU_BACKENDS:
        if not sf.backends.state(backend).available:
            continue
        x = torch.randn(3, 1001, device="cuda:1")
        table, row = torch.rand(2, 3, device="cuda:1"), torch.tensor(1, device="cuda:1")
        with torch.cuda.device(0):
            got = sf.ops.fused_update_table(x, [x], table, row, seed=3, backend=backend)
            snr, _ = sf.ops.snr_langevin_step(x, -x, 0.16, seed=3, step=1, backend=backend)
        ref = sf.ops.fused_update_table(x.cpu().double(), [x.cpu().double()], table.cpu().double(), row.cpu(), seed=3)
        torch.testing.assert_close(got.cpu().double(), ref, atol=1e-5, rtol=5e-6)
        assert torch.isfinite(snr).all()


def test_adaptive_step_ops_vs_reference_on_gpu(backend):
    """The adaptive solvers' per-attempt ops (step control, scaled error norm, row selects,
    adaptive_sde's table) on CUDA tensors against the torch reference on the CPU (the cuda backend's
    CUDA kernels, the triton backend's Triton kernels)."""
    from scorefast.ops import scaled_sumsq as ss_mod
    from scorefast.ops import select_rows as sel_mod
    from scorefast.ops import step_control as sc_mod
    from tests.test_step_control import C_STAGE, RULES, _problem

    for rule in ("rk45", "sde"):
        outs = {}
        for dev, name in (("cpu", "torch"), ("cuda", backend)):
            state, sumsq, t_end, direction, base, mult, numel = (
                v.to(dev) if isinstance(v, torch.Tensor) else v for v in _problem(1000, 3)
            )
            stage_t = torch.empty(7, 1000, dtype=torch.float64, device=dev)
            table = torch.empty(base.shape[0], 1000, dtype=torch.float32, device=dev)
            n, c_stage = torch.tensor(4, device=dev), C_STAGE.to(dev)
            accept = sc_mod.step_control(state, sumsq, t_end, direction, n, c_stage, stage_t, base, mult, table,
                                         numel=numel, backend=name, **RULES[rule])  # fmt: skip
            outs[dev] = [accept, state, stage_t, table]
        assert torch.equal(outs["cuda"][0].cpu(), outs["cpu"][0])
        for got, want in zip(outs["cuda"][1:], outs["cpu"][1:]):
            torch.testing.assert_close(got.cpu(), want, rtol=1e-13, atol=1e-13, equal_nan=True)
    from scorefast.ops import sample_sumsq

    g = torch.Generator().manual_seed(0)
    e, y, y2 = (torch.randn(37, 5001, generator=g) for _ in range(3))
    for mode in ("rk45", "sde"):
        want = ss_mod.scaled_sumsq(e, y, y2, rtol=1e-3, atol=1e-4, mode=mode, backend="torch")
        got = ss_mod.scaled_sumsq(e.cuda(), y.cuda(), y2.cuda(), rtol=1e-3, atol=1e-4, mode=mode, backend=backend)
        torch.testing.assert_close(got.cpu().double(), want.double(), rtol=1e-5, atol=0)
        # bitwise the backend's own sums of the reference's scaled rows (the scaling rounds as torch's),
        # and each sample's sum is its own whatever the batch
        rows = ss_mod.scaled_rows_ref(e, y, y2, 1e-3, 1e-4, mode).cuda()
        assert torch.equal(got, sample_sumsq(rows, backend=backend))
        part = ss_mod.scaled_sumsq(e[5:12].cuda(), y[5:12].cuda(), y2[5:12].cuda(), rtol=1e-3, atol=1e-4, mode=mode,
                                   backend=backend)  # fmt: skip
        assert torch.equal(part, got[5:12])
    mask = torch.rand(37, generator=g) < 0.5
    got = sel_mod.select_rows(mask.cuda(), [e.cuda()], [y.cuda()], backend=backend)[0]
    assert torch.equal(got.cpu(), torch.where(mask[:, None], e, y))
    for dtype, row in ((torch.float16, (3,)), (torch.float64, (2, 3)), (torch.bfloat16, (1,))):  # 2- to 8-byte words
        new, old = (torch.randn(37, *row, generator=g).to(dtype) for _ in range(2))
        m = mask.view(-1, *(1,) * len(row))
        got = sel_mod.select_rows(mask[3:].cuda(), [new[3:].cuda()], [old[3:].cuda()], backend=backend)[0]
        assert torch.equal(got.cpu(), torch.where(m, new, old)[3:])  # rows off a 16-byte start
    from scorefast.ops import sde_coefs as coefs_mod
    from tests.test_sde_coefs import _fold
    from tests.test_sde_coefs import _problem as coefs_problem

    h, times, a, b = coefs_problem(1000)
    fa, fb = _fold(times)
    for fold in ((), (fa, fb)):
        want = coefs_mod.sde_coefs(h, times, a, b, *fold, dtype=torch.float64, backend="torch")
        got = coefs_mod.sde_coefs(*(v.cuda() for v in (h, times, a, b, *fold)), dtype=torch.float64, backend=backend)
        assert torch.equal(got.cpu(), want)  # sqrt and each product and sum rounded once: IEEE, as the CPU
        got32 = coefs_mod.sde_coefs(*(v.cuda() for v in (h, times, a, b, *fold)), dtype=torch.float32, backend=backend)
        assert torch.equal(got32.cpu(), want.float())


def test_rk45_and_adaptive_sde_graph_replay_equals_eager_on_gpu(backend):
    """A captured attempt (six stages, the fused controller; adaptive_sde's kept Brownian intervals too)
    replays to the eager samples."""
    gm = sf.testing.GaussianMixture.builtin()
    sde = sf.sde.VPSDE()
    score = gm.score_fn(sde)
    for sampler, options in (("rk45", {}), ("adaptive_sde", {}), ("adaptive_sde", {"brownian": "bridge"})):
        kw = dict(sampler=sampler, seed=1, device="cuda", backend=backend, return_info=True, **options)
        eager, info_e = sf.sample(score, sde, (256, 2), cuda_graph=False, **kw)
        graphed, info_g = sf.sample(score, sde, (256, 2), cuda_graph=True, **kw)
        assert info_g["graphed"]
        torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
        assert torch.equal(info_g["nfe_per_sample"], info_e["nfe_per_sample"])
