"""``sf.sample(cuda_graph=True)``: a replayed step equals the eager step, for every sampler.

Without a GPU the real capture code runs under ``graphs.emulated()``, the CPU stand-in for
``torch.cuda.CUDAGraph`` / ``torch.cuda.graph`` (``scorefast._capture_standin``): it records the
dispatched ops of the capture and replays them at the capture's addresses, which, like a CUDA
graph, freezes every host value.  A body that read a per-step value on the host would replay step
k+1's graph with step k's numbers and fail these tests; one that reads a tensor on the host is
refused as CUDA refuses it and must take the (warned) fallback; outputs that alias the static
buffers are copied back in order, so aliasing shows as a wrong sample.  The ``cuda`` tests run
the real capture on a GPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import scorefast as sf
from scorefast import graphs
from scorefast.errors import NonFiniteError
from scorefast.sde import EDM, VESDE, VPSDE, DiscreteVP, SubVPSDE
from tests.conftest import backend_params
from tests.test_samplers import linear_score

GM = sf.testing.GaussianMixture.ring(4, 3.0, 0.4)
GM3 = sf.testing.GaussianMixture.ring(4, 3.0, 0.4, dim=3)

FIXED_STEP = [
    ("euler_maruyama", VPSDE(), {}),
    ("euler_maruyama", SubVPSDE(), {}),
    ("reverse_diffusion", VESDE(0.01, 10), {}),
    ("ancestral", VPSDE(), {}),
    ("ancestral", EDM(), {}),
    ("ddim", DiscreteVP(torch.linspace(0.9999, 0.01, 1000).double()), {}),
    ("ddim", VPSDE(), {"eta": 0.7}),
    ("pc", VESDE(0.01, 10), {"n_corrector": 2}),
    ("pc", VPSDE(), {"predictor": "euler_maruyama", "norm": "batch"}),
    ("ode_euler", VPSDE(), {}),
    ("heun", EDM(), {}),
    ("heun", EDM(), {"s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 10.0}),
    ("dpm_solver++", VPSDE(), {}),
    ("dpm_solver++", EDM(), {"variant": "2m-sde"}),
    ("dpm_solver++", VESDE(0.01, 10), {"variant": "3m", "eta": 1.0}),
    ("unipc", VPSDE(), {}),
    ("unipc", EDM(), {"order": 3, "variant": "bh1"}),
    ("unipc", VESDE(0.01, 10), {"order": 1, "corrector": False}),
    ("langevin", VESDE(0.01, 10), {}),
    ("annealed_langevin", VESDE(0.01, 10), {"n_steps_each": 3}),
]
IDS = [f"{name}-{type(sde).__name__}-{i}" for i, (name, sde, _) in enumerate(FIXED_STEP)]


def _both(score, sde, shape, *, device="cpu", **kw):
    """(eager, graphed) samples and infos; warnings are errors, so a fallback fails the test."""
    eager = sf.sample(score, sde, shape, device=device, return_info=True, **kw)
    with warnings.catch_warnings(), graphs.emulated():
        warnings.simplefilter("error")
        graphed = sf.sample(score, sde, shape, device=device, cuda_graph=True, return_info=True, **kw)
    return eager, graphed


@pytest.mark.parametrize("name,sde,options", FIXED_STEP, ids=IDS)
def test_replay_equals_eager_for_every_fixed_step_sampler(name, sde, options):
    (a, ia), (b, ib) = _both(GM.score_fn(sde), sde, (33, 2), sampler=name, steps=9, seed=5, **options)
    assert torch.equal(a, b), (a - b).abs().max()
    assert ia["nfe"] == ib["nfe"]


@pytest.mark.parametrize("backend", backend_params())
def test_replay_equals_eager_on_every_backend(backend):
    sde = VPSDE()
    for name in ("euler_maruyama", "pc"):
        (a, _), (b, _) = _both(GM3.score_fn(sde), sde, (17, 3), sampler=name, steps=7, seed=2, backend=backend)
        assert torch.equal(a, b), (name, (a - b).abs().max())


def test_replay_equals_eager_in_float64_and_bf16():
    sde = VPSDE()
    (a, _), (b, _) = _both(linear_score(sde), sde, (9, 2), sampler="dpm_solver++", steps=8, dtype=torch.float64)
    assert a.dtype == torch.float64 and torch.equal(a, b)
    net = sf.models.build("MLP", dim=2, hidden=32, layers=2)
    score = sf.adapters.from_eps(net, sde)
    with torch.no_grad():
        (a, _), (b, _) = _both(score, sde, (16, 2), sampler="euler_maruyama", steps=6, precision="bf16")
    assert torch.equal(a, b)


def test_noise_of_a_replay_is_bitwise_the_eager_noise():
    """A zero score makes every step pure noise on the stream: the replayed draws are the same numbers."""
    sde = VESDE(0.01, 10)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    for name in ("euler_maruyama", "langevin", "ancestral"):
        (a, _), (b, _) = _both(zero, sde, (5, 7), sampler=name, steps=6, seed=2**63 + 11)
        assert torch.equal(a, b) and a.abs().sum() > 0


def test_replays_really_replay_a_frozen_step():
    """Host state the network keeps in Python is frozen by capture (as on CUDA): the graphed samples differ
    and the network ran only for the warm-up and the capture.  This is what makes the tests above mean
    something: per-step values read on the host would be frozen the same way."""
    sde = VPSDE()
    calls = [0]

    def stateful(x, t):
        calls[0] += 1
        return GM.score(x, t, sde) * (1 + 0.1 * calls[0])

    a = sf.sample(stateful, sde, (8, 2), sampler="euler_maruyama", steps=10)
    assert calls[0] == 10
    calls[0] = 0
    with graphs.emulated():
        b, info = sf.sample(
            stateful, sde, (8, 2), sampler="euler_maruyama", steps=10, cuda_graph=True, return_info=True
        )
    assert calls[0] == 3  # warm-up, capture, and the eager last step
    assert info["nfe"] == 10
    assert not torch.allclose(a, b)


def test_a_network_that_syncs_falls_back_with_one_warning_and_the_same_samples():
    sde = VPSDE()

    def syncing(x, t):
        if float(x.abs().max()) > 1e30:  # a host read: cannot be captured
            raise AssertionError
        return GM.score(x, t, sde)

    a = sf.sample(syncing, sde, (8, 2), sampler="pc", steps=8)
    with graphs.emulated(), pytest.warns(RuntimeWarning, match="cuda_graph: step 1 could not be captured") as rec:
        b = sf.sample(syncing, sde, (8, 2), sampler="pc", steps=8, cuda_graph=True)
    assert len([w for w in rec if "cuda_graph" in str(w.message)]) == 1
    assert torch.equal(a, b)


def test_the_fallback_warning_names_the_error_that_broke_the_capture():
    """On CUDA (and the stand-in), leaving ``torch.cuda.graph`` after a failed body raises a second,
    generic error (capture_end of an invalidated capture); the warning must still say what the
    network did."""
    sde = VPSDE()

    def reads_the_host(x, t):
        if x.sum().item() > 1e30:  # a device-to-host copy: not permitted while capturing
            raise AssertionError
        return GM.score(x, t, sde)

    with graphs.emulated(), pytest.warns(RuntimeWarning, match="could not be captured") as rec:
        sf.sample(reads_the_host, sde, (4, 2), sampler="euler_maruyama", steps=4, cuda_graph=True)
    (message,) = [str(w.message) for w in rec if "cuda_graph" in str(w.message)]
    assert "previous error during capture" not in message
    assert "operation not permitted when stream is capturing" in message, message
    assert "_local_scalar_dense" in message, message  # what .item() is to the dispatcher


def test_dynamic_shapes_fall_back():
    sde = VPSDE()

    def dynamic(x, t):
        keep = x[:, 0] > -1e30
        s = torch.zeros_like(x)
        s[keep.nonzero()[:, 0]] = -x[keep]  # a data-dependent shape
        return s

    a = sf.sample(dynamic, sde, (6, 2), sampler="ode_euler", steps=6)
    with graphs.emulated(), pytest.warns(RuntimeWarning, match="data-dependent"):
        b = sf.sample(dynamic, sde, (6, 2), sampler="ode_euler", steps=6, cuda_graph=True)
    assert torch.equal(a, b)


def test_callback_and_progress_see_every_replayed_step():
    sde = VPSDE()
    seen = {False: [], True: []}
    for graphed in (False, True):
        with graphs.emulated():
            sf.sample(
                GM.score_fn(sde),
                sde,
                (4, 2),
                sampler="dpm_solver++",
                steps=7,
                cuda_graph=graphed,
                progress=True,
                callback=lambda d, g=graphed: seen[g].append((d["i"], d["x"], d["t"], d["denoised"])),
            )
    assert [s[0] for s in seen[True]] == [s[0] for s in seen[False]] == list(range(7))
    for (_, x1, t1, d1), (_, x2, t2, d2) in zip(seen[False], seen[True], strict=True):
        assert torch.equal(x1, x2) and torch.equal(t1, t2) and torch.equal(d1, d2)


def test_non_finite_flag_survives_replays_and_names_the_step():
    """The flag is a device tensor updated in place by the graph and read once after the run."""
    sde = VPSDE()

    def bad_late(x, t):  # NaN once t < 0.5, decided on the device
        s = GM.score(x, t, sde)
        return torch.where((t < 0.5)[:, None], torch.full_like(s, float("nan")), s)

    messages = []
    for graphed in (False, True):
        with graphs.emulated(), pytest.raises(NonFiniteError) as err:
            # score_sde's uniform-t grid: t < 0.5 from step 10 on
            sf.sample(bad_late, sde, (4, 2), sampler="euler_maruyama", steps=20, schedule="uniform", cuda_graph=graphed)
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "step 10" in messages[0]


def test_rk45_captures_one_attempt_per_replay():
    sde = VPSDE()
    kw = dict(sampler="rk45", rtol=1e-4, atol=1e-4, seed=1)
    (a, ia), (b, ib) = _both(linear_score(sde), sde, (12, 2), **kw)
    assert torch.equal(a, b)
    assert torch.equal(ia["nfe_per_sample"], ib["nfe_per_sample"])


def test_inpaint_under_graphs_equals_eager():
    sde = VESDE(0.01, 10)
    data = GM.sample(6, seed=4).float()
    mask = torch.zeros_like(data)
    mask[:, 0] = 1
    kw = dict(sampler="pc", steps=8, seed=3)
    a = sf.conditional.inpaint(GM.score_fn(sde), sde, data, mask, **kw)
    with warnings.catch_warnings(), graphs.emulated():
        warnings.simplefilter("error")
        b = sf.conditional.inpaint(GM.score_fn(sde), sde, data, mask, cuda_graph=True, **kw)
    assert torch.equal(a, b)


def test_cuda_graph_on_cpu_is_a_no_op():
    sde = VPSDE()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = sf.sample(GM.score_fn(sde), sde, (8, 2), sampler="heun", steps=5, cuda_graph=True)
    assert torch.equal(a, sf.sample(GM.score_fn(sde), sde, (8, 2), sampler="heun", steps=5))


# -- the real capture -----------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("name,sde,options", FIXED_STEP, ids=IDS)
def test_cuda_replay_equals_eager(name, sde, options):
    """On a GPU: captured without a fallback; noise bitwise (zero score), state allclose (mixture score)."""
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    kw = dict(sampler=name, steps=9, seed=5, device="cuda", **options)
    for score, exact in ((zero, True), (GM3.score_fn(sde), False)):
        (a, ia), (b, ib) = _both(score, sde, (64, 3), **kw)
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert ia["nfe"] == ib["nfe"]


@pytest.mark.cuda
def test_cuda_graph_with_a_bf16_unet():
    sde = VESDE(0.01, 50)
    net = sf.models.build("UNet", in_channels=1, ch=16, num_res_blocks=1).cuda()
    score = sf.adapters.from_eps(net, sde)
    with torch.no_grad():
        (a, _), (b, _) = _both(score, sde, (8, 1, 8, 8), device="cuda", sampler="heun", steps=10, precision="bf16")
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert torch.isfinite(b).all()


def test_step_table_reads_the_same_values_by_int_and_by_device_index():
    rows = torch.tensor([[0.1, 2.0, -3.0], [1e-7, 5.0, 0.25]], dtype=torch.float64)
    table = sf.samplers.base.StepTable(rows, torch.device("cpu"), on_device=True)
    for n in range(2):
        by_int = table[n]
        by_tensor = table[torch.tensor(n)]
        assert all(isinstance(v, float) for v in by_int)
        assert all(v.dim() == 0 and v.dtype == torch.float64 for v in by_tensor)
        assert [float(v) for v in by_tensor] == list(by_int) == rows[n].tolist()
