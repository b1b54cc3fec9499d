"""The CPU stand-in for CUDA-graph capture (``graphs.emulated()``) behaves as a CUDA graph does, and
through it the real capture code replays every sampler (the registry, so new ones are covered)
and the training step exactly like eager runs.

Checked by planting bugs (see the report of the change): copying a multistep body's outputs back
in index order (dpm_solver++ 3m's history aliasing) fails ``test_every_registered_sampler...``
and the 3m cases; a step table read by a per-step host counter fails the replay tests.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import scorefast as sf
from scorefast import _capture_standin, graphs, models
from scorefast.samplers import SAMPLERS
from scorefast.sde import EDM, VESDE, VPSDE
from scorefast.train import EMA, TrainStep

GM = sf.testing.GaussianMixture.ring(4, 3.0, 0.4)
VE_ONLY = {"annealed_langevin"}
FAST = {  # options that keep each registered sampler's run short (the defaults of the rest)
    "annealed_langevin": {"n_steps_each": 3},
    "adaptive_sde": {"rtol": 0.1, "atol": 0.1, "h_init": 0.1},
    "rk45": {"rtol": 1e-3, "atol": 1e-3},
}


# -- the stand-in itself ----------------------------------------------------------------------
def test_capture_changes_nothing_and_replay_writes_at_the_captured_addresses():
    """A GPU capture runs no kernel: what existed before is unchanged after it.  A replay writes in
    place into what existed (the counter advances) and into the tensors the capture made."""
    buf, counter = torch.arange(4.0), torch.zeros((), dtype=torch.int64)
    with graphs.emulated() as stats:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            doubled = buf * 2 + 1.5  # the host scalar 1.5 is frozen into the graph
            buf.copy_(doubled)
            counter.add_(1)
        assert torch.equal(buf, torch.arange(4.0)) and int(counter) == 0
        for k in range(1, 4):
            g.replay()
            assert int(counter) == k
            assert torch.equal(doubled, buf)  # the capture's own output holds the replay's value
    expected = torch.arange(4.0)
    for _ in range(3):
        expected = expected * 2 + 1.5
    assert torch.equal(buf, expected)
    assert (stats.graphs, stats.captures, stats.replays) == (1, 1, 3)


def _scale_graph(table, out):
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out.copy_(out * table)
    return g


def test_a_replay_of_a_freed_tensor_is_refused():
    """A CUDA graph keeps nothing alive: a tensor from before the capture that died since would be freed
    memory on a GPU.  The stand-in holds it weakly and refuses the replay, naming it."""
    out = torch.ones(3)
    with graphs.emulated():
        table = torch.full((3,), 2.0)
        g = _scale_graph(table, out)
        g.replay()
        assert out.tolist() == [2.0] * 3
        del table
        with pytest.raises(RuntimeError, match=r"float32 tensor of shape \(3,\) .* freed"):
            g.replay()


def test_a_replay_after_a_storage_swap_is_refused():
    """``module.half()`` / ``.to()`` swaps a parameter's data under the same object: the graph's address is stale."""
    out = torch.ones(3)
    with graphs.emulated():
        weight = torch.nn.Parameter(torch.full((3,), 2.0), requires_grad=False)
        g = _scale_graph(weight, out)
        weight.data = weight.data.clone()  # same object, new storage
        with pytest.raises(RuntimeError, match="storage moved or changed dtype"):
            g.replay()


@pytest.mark.parametrize(
    "body",
    [
        lambda x: x.sum().item(),
        lambda x: bool(x.max() > 0),
        lambda x: x.nonzero(),
        lambda x: x[x > 0],
        lambda x: torch.unique(x),
        lambda x: torch.equal(x, x),
    ],
    ids=["item", "bool", "nonzero", "mask-index", "unique", "equal"],
)
def test_host_reads_and_data_dependent_shapes_are_refused_as_cuda_refuses_them(body):
    x = torch.randn(5)
    with graphs.emulated() as stats:
        g = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="previous error during capture") as err:
            with torch.cuda.graph(g):
                body(x)
        assert "operation not permitted when stream is capturing" in str(err.value.__context__)
        with pytest.raises(RuntimeError, match="not captured"):
            g.replay()
        assert not torch.cuda.is_current_stream_capturing()
    assert stats.captures == 0


def test_the_stand_in_is_removed_after_the_block():
    real = torch.cuda.CUDAGraph
    with graphs.emulated():
        assert torch.cuda.CUDAGraph is _capture_standin.CUDAGraph
        assert graphs.mode_for(torch.device("cpu"), True) == "cuda"
    assert torch.cuda.CUDAGraph is real and graphs.mode_for(torch.device("cpu"), True) is None


# -- copying outputs back into the static buffers ---------------------------------------------
@pytest.mark.parametrize(
    "order", [(0, 1, 2), (0, 0, 1), (0, 2, 1), (1, 2, 0), (2, 2, 2)], ids=["same", "shift", "swap", "cycle", "fan"]
)
def test_copy_back_is_right_whatever_the_outputs_alias(order):
    """out[i] = static[order[i]] (a multistep body returning its history shifted, swapped, ...)."""
    static = tuple(torch.full((3,), float(i)) for i in range(3))
    graphs._copy_back(static, tuple(static[j] for j in order))
    assert [float(b[0]) for b in static] == [float(j) for j in order]


def test_copy_back_with_new_values_and_a_view_of_its_own_buffer():
    static = (torch.arange(4.0), torch.zeros(4), torch.ones(4))
    graphs._copy_back(static, (static[0].flip(0), static[0] + 1, static[1]))
    assert static[0].tolist() == [3.0, 2.0, 1.0, 0.0]
    assert static[1].tolist() == [1.0, 2.0, 3.0, 4.0] and static[2].tolist() == [0.0] * 4


# -- every sampler through the real capture code ----------------------------------------------
VARIANTS = [
    ("dpm_solver++", VPSDE(), {"variant": "2m"}),
    ("dpm_solver++", VPSDE(), {"variant": "2m-sde", "eta": 0.5}),
    ("dpm_solver++", EDM(), {"variant": "3m", "eta": 0.0}),
    ("dpm_solver++", VPSDE(), {"variant": "3m", "eta": 0.8}),
    ("rk45", VPSDE(), {"rtol": 1e-3, "atol": 1e-3}),
    ("adaptive_sde", VPSDE(), {"rtol": 0.1, "atol": 0.1, "h_init": 0.1}),
    ("adaptive_sde", VPSDE(), {"rtol": 0.1, "atol": 0.1, "h_init": 0.1, "error_norm": "batch"}),
    ("adaptive_sde", VESDE(0.01, 10), {"rtol": 0.1, "atol": 0.1, "brownian": "bridge"}),
]


def _eager_and_graphed(name, sde, options, *, steps=9, seed=5, shape=(17, 2)):
    kw = dict(sampler=name, seed=seed, return_info=True, **options)
    if name not in ("rk45", "adaptive_sde"):
        kw["steps"] = steps
    score = GM.score_fn(sde)
    eager = sf.sample(score, sde, shape, **kw)
    with warnings.catch_warnings(), graphs.emulated() as stats:
        warnings.simplefilter("error")  # a fallback fails the test
        graphed = sf.sample(score, sde, shape, cuda_graph=True, **kw)
    return eager, graphed, stats


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_registered_sampler_replays_like_eager(name):
    sde = VESDE(0.01, 10) if name in VE_ONLY else VPSDE()
    (a, ia), (b, ib), stats = _eager_and_graphed(name, sde, FAST.get(name, {}))
    assert ib["graphed"] and stats.captures >= 1 and stats.replays >= 1
    assert torch.equal(a, b), (a - b).abs().max()
    assert ia["nfe"] == ib["nfe"]


@pytest.mark.parametrize("name,sde,options", VARIANTS, ids=[f"{n}-{o}" for n, _, o in VARIANTS])
def test_every_variant_replays_like_eager(name, sde, options):
    (a, ia), (b, ib), stats = _eager_and_graphed(name, sde, options)
    assert ib["graphed"] and stats.replays >= 1
    assert torch.equal(a, b), (a - b).abs().max()
    assert ia["nfe"] == ib["nfe"]


# -- the training step ------------------------------------------------------------------------
def _train_step(loss="dsm"):
    torch.manual_seed(0)
    model = models.build("MLP", dim=2, hidden=16, layers=2)
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-2), capturable=True, fused=True)
    ema = EMA(model, decay=0.99, warmup=3)
    return TrainStep(model, opt, loss, sde=VPSDE(), ema=ema, warmup=4, grad_clip=0.5, check_every=4, device_state=True)


def _batch(n: int) -> torch.Tensor:
    return torch.randn(32, 2, generator=torch.Generator().manual_seed(n))


def test_captured_train_step_replays_like_eager_bitwise():
    """GraphedTrainStep's real capture path (device_state=True) through the stand-in: every loss,
    parameter, EMA shadow and the device step counter equal the eager run's bitwise."""
    eager = _train_step()
    with warnings.catch_warnings(), graphs.emulated() as stats:
        warnings.simplefilter("error")
        graphed = _train_step().cuda_graph(warmup=2)
        for n in range(9):
            assert torch.equal(graphed(_batch(n)), eager(_batch(n))), n
    assert (stats.graphs, stats.captures, stats.replays) == (1, 1, 7)
    assert graphed.step.step == eager.step == 9 and int(graphed.step._step_t) == 9
    for p, q in zip(graphed.step.model.parameters(), eager.model.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(graphed.step.ema.shadow, eager.ema.shadow, strict=True):
        assert torch.equal(p, q)


def test_a_train_step_that_syncs_falls_back_with_one_warning_and_the_same_losses():
    def syncing_dsm(score_fn, x, sde, **kw):
        loss = sf.losses.dsm_loss(score_fn, x, sde, return_per_sample=True, **kw)
        if float(loss.detach().sum()) < -1.0:  # a host read: cannot be captured
            raise AssertionError
        return loss

    eager = _train_step(syncing_dsm)
    with graphs.emulated() as stats, pytest.warns(RuntimeWarning, match="training step could not be captured") as rec:
        graphed = _train_step(syncing_dsm).cuda_graph(warmup=1)
        for n in range(4):
            assert torch.equal(graphed(_batch(n)), eager(_batch(n)))
    assert len([w for w in rec if "cuda_graph" in str(w.message)]) == 1
    assert stats.captures == 0 and graphed.step.step == 4
