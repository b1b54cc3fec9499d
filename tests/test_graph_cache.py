"""One capture per configuration: ``sf.sample(cuda_graph=True)`` caches the captured step and later
calls with the same configuration replay it, with their own seed, sample ids, initial state and
extra_args copied into its static inputs (through the CPU stand-in of ``graphs.emulated()``).

Checked by planting bugs (see the report of the change): a seed frozen into the graph (not a static
input) and frozen sample ids fail the "another seed / other ids" tests; an entry that does not hold
the capturing run's context and step closures fails 25 tests here (the stand-in refuses the replay
of a freed tensor); each keyed state (ambient autocast / inference mode, module training and
storage, the SDE's class), the busy mark set after the warm-up, the flags shared with the entry and
a seed tensor cached before the capture fail their own tests on the code before their fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import threading
import warnings
import weakref

import pytest
import torch

import scorefast as sf
from scorefast import graphs
from scorefast.distributed import load_samples, sample_sharded
from scorefast.samplers import SAMPLERS
from scorefast.sde import VESDE, VPSDE
from tests.test_capture_standin import FAST, VARIANTS, VE_ONLY

GM = sf.testing.GaussianMixture.ring(4, 3.0, 0.4)
SDE = VPSDE()
SCORE = GM.score_fn(SDE)  # one score function object for every call: the cache keys it by identity


def _graphed(score=SCORE, sde=SDE, shape=(12, 2), **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a capture fallback fails the test
        return sf.sample(score, sde, shape, cuda_graph=True, **kw)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_a_second_call_replays_the_cached_graph_with_its_own_seed_and_ids(name):
    """Every registered sampler: the second call captures nothing, and gives the eager result of its own
    seed and sample ids (the seed and ids are static inputs of the graph, not frozen in it)."""
    sde = VESDE(0.01, 10) if name in VE_ONLY else SDE
    score = GM.score_fn(sde)
    kw = dict(sampler=name, **FAST.get(name, {}))
    if name not in ("rk45", "adaptive_sde"):
        kw["steps"] = 8
    calls = [dict(seed=3), dict(seed=11, sample_ids=torch.arange(100, 112)), dict(seed=2**63 + 5)]
    with graphs.emulated() as stats:
        outs = [_graphed(score, sde, **kw, **calls[0])]
        first = stats.graphs
        outs += [_graphed(score, sde, **kw, **c) for c in calls[1:]]
    assert first >= 1 and stats.graphs == first  # no capture after the first call
    for c, out in zip(calls, outs, strict=True):  # an earlier result is not rewritten by a later call
        eager = sf.sample(score, sde, (12, 2), **kw, **c)
        assert torch.equal(out, eager), (c, (out - eager).abs().max())
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name,sde,options", VARIANTS, ids=[f"{n}-{o}" for n, _, o in VARIANTS])
def test_every_variant_replays_the_cached_graph_with_its_own_seed(name, sde, options):
    """Every variant (2m-sde and 3m with eta > 0 run their first loop eagerly: a seed tensor made before the
    capture must not be frozen into the cached graph)."""
    score = GM.score_fn(sde)
    kw = dict(sampler=name, **options)
    if name not in ("rk45", "adaptive_sde"):
        kw["steps"] = 8
    calls = [dict(seed=3), dict(seed=11, sample_ids=torch.arange(100, 112))]
    with graphs.emulated() as stats:
        outs = [_graphed(score, sde, **kw, **calls[0])]
        first = stats.graphs
        outs.append(_graphed(score, sde, **kw, **calls[1]))
    assert first >= 1 and stats.graphs == first  # the second call replayed the cached graph
    for c, out in zip(calls, outs, strict=True):
        eager = sf.sample(score, sde, (12, 2), **kw, **c)
        assert torch.equal(out, eager), (c, (out - eager).abs().max())


def test_x_init_and_extra_args_tensors_are_inputs_too():
    def conditional(x, t, shift):
        return GM.score(x, t, SDE) + shift

    kw = dict(sampler="ode_euler", steps=6, t_start=0.5)
    runs = [(torch.full((12, 2), v), torch.full((12, 1), -v)) for v in (0.5, -1.0)]
    with graphs.emulated() as stats:
        outs = [_graphed(conditional, x_init=x0, extra_args={"shift": s}, **kw) for x0, s in runs]
    assert stats.graphs == 1
    for (x0, s), out in zip(runs, outs, strict=True):
        assert torch.equal(out, sf.sample(conditional, SDE, (12, 2), x_init=x0, extra_args={"shift": s}, **kw))
    assert torch.equal(runs[0][1], torch.full((12, 1), -0.5))  # the user's tensors are never written


@pytest.mark.parametrize(
    "change",
    [
        dict(steps=9),
        dict(shape=(13, 2)),
        dict(dtype=torch.float64),
        dict(precision="bf16"),
        dict(sampler="pc"),
        dict(sde=VPSDE(beta_max=15.0)),
        dict(schedule="karras"),
        dict(score=GM.score_fn(SDE)),
    ],
    ids=lambda c: next(iter(c)),
)
def test_another_configuration_captures_again(change):
    base = dict(sampler="euler_maruyama", steps=8, seed=1)
    with graphs.emulated() as stats:
        _graphed(**base)
        _graphed(**{**base, **change})
    assert stats.graphs == 2


def test_the_cache_keeps_the_network_alive_until_eviction_or_clear_cache():
    """A CUDA graph reads the network's memory by address: the entry holds the network (and the tables
    the capture read) until it is evicted (least recently used first) or ``clear_cache()`` runs."""
    net = sf.models.build("MLP", dim=2, hidden=8, layers=1)
    score = sf.adapters.from_eps(net, SDE)
    alive = weakref.ref(net)
    with graphs.emulated() as stats, torch.no_grad():
        first = _graphed(score, sampler="euler_maruyama", steps=5, seed=1)
        assert len(graphs._CACHE) == 1
        del score, net
        gc.collect()
        assert alive() is not None  # the cached graph still reads it
        sf.graphs.clear_cache()
        gc.collect()
        assert alive() is None and len(graphs._CACHE) == 0
        net = sf.models.build("MLP", dim=2, hidden=8, layers=1)
        score = sf.adapters.from_eps(net, SDE)
        alive = weakref.ref(net)
        _graphed(score, sampler="euler_maruyama", steps=5)
        del score, net
        for steps in range(6, 6 + graphs.CACHE_SIZE):  # the network's entry is the oldest: evicted
            _graphed(sampler="euler_maruyama", steps=steps)
        gc.collect()
        assert alive() is None and len(graphs._CACHE) == graphs.CACHE_SIZE
        before = stats.graphs
        _graphed(sampler="euler_maruyama", steps=5 + graphs.CACHE_SIZE)  # the newest: still cached
        assert stats.graphs == before
        _graphed(sampler="euler_maruyama", steps=5)  # evicts steps=6, the least recently used
        _graphed(sampler="euler_maruyama", steps=6)  # captured again
        assert stats.graphs == before + 2
        sf.graphs.clear_cache()
        assert len(graphs._CACHE) == 0
        _graphed(sampler="euler_maruyama", steps=6)
        assert stats.graphs == before + 3
    assert first.shape == (12, 2)


def test_a_bound_method_score_is_cached_by_its_object():
    class Model:
        def score(self, x, t):
            return GM.score(x, t, SDE)

    model = Model()
    with graphs.emulated() as stats:
        a = _graphed(model.score, sampler="heun", steps=6, seed=1)
        b = _graphed(model.score, sampler="heun", steps=6, seed=2)  # a new bound method of the same object
        assert stats.graphs == 1 and len(graphs._CACHE) == 1
        _graphed(Model().score, sampler="heun", steps=6, seed=2)  # another object: another graph
        assert stats.graphs == 2
    assert not torch.equal(a, b)


def test_a_score_fn_with_eq_but_no_hash_is_keyed_by_identity():
    """A callable dataclass (``__eq__`` and ``__hash__ = None``): cached by identity, never hashed."""

    @dataclasses.dataclass
    class Scaled:
        scale: float

        def __call__(self, x, t):
            return self.scale * GM.score(x, t, SDE)

    kw = dict(sampler="ddim", steps=6, seed=4)
    one, same = Scaled(1.0), Scaled(1.0)
    with graphs.emulated() as stats:
        out = _graphed(one, **kw)
        _graphed(one, **kw)
        assert stats.graphs == 1
        _graphed(same, **kw)  # equal but another object: not assumed to compute the same
        assert stats.graphs == 2
    assert torch.equal(out, sf.sample(one, SDE, (12, 2), **kw))


def test_sharded_chunks_of_one_shape_share_one_graph(tmp_path):
    kw = dict(sample_shape=(2,), chunk=4, sampler="euler_maruyama", steps=6, seed=2)
    sample_sharded(SCORE, SDE, 10, tmp_path / "eager", **kw)
    with graphs.emulated() as stats:
        sample_sharded(SCORE, SDE, 10, tmp_path / "graphed", cuda_graph=True, **kw)
    assert stats.graphs == 2  # chunks of 4, 4 and 2: one graph per chunk shape
    assert torch.equal(load_samples(tmp_path / "graphed"), load_samples(tmp_path / "eager"))


def test_a_conditional_projection_is_not_cached():
    data = GM.sample(6, seed=4).float()
    mask = torch.zeros_like(data)
    mask[:, 0] = 1
    with graphs.emulated() as stats:
        for _ in range(2):
            sf.conditional.inpaint(SCORE, SDE, data, mask, sampler="pc", steps=6, cuda_graph=True)
    assert stats.graphs == 2 and len(graphs._CACHE) == 0


def test_a_callback_sampling_the_same_configuration_does_not_share_the_graph_in_use():
    kw = dict(sampler="euler_maruyama", steps=6)
    inner = []

    def callback(info):
        if info["i"] == 3 and not inner:
            inner.append(_graphed(seed=9, **kw))

    with graphs.emulated() as stats:
        _graphed(seed=1, **kw)  # cached
        outer = _graphed(seed=1, callback=callback, **kw)
    assert stats.graphs == 2  # the inner call captured its own (uncached) graph
    assert torch.equal(outer, sf.sample(SCORE, SDE, (12, 2), seed=1, **kw))
    assert torch.equal(inner[0], sf.sample(SCORE, SDE, (12, 2), seed=9, **kw))


def test_an_sde_class_defined_twice_is_another_configuration():
    """Two classes of one name (a factory, a re-run notebook cell) and equal attributes are keyed apart."""

    def make(scale):
        class MySDE(VPSDE):
            def std(self, t):
                return super().std(t) * scale

        return MySDE()

    score = lambda x, t: -x  # noqa: E731
    kw = dict(sampler="ddim", steps=8, seed=1)
    sde = make(0.5)
    with graphs.emulated() as stats:
        _graphed(score, make(1.0), shape=(6, 2), **kw)
        out = _graphed(score, sde, shape=(6, 2), **kw)
    assert stats.graphs == 2
    assert torch.equal(out, sf.sample(score, sde, (6, 2), **kw))


class _DropoutNet(torch.nn.Module):
    """A tiny eps network whose output depends on training mode (dropout) and on its parameters' dtype."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 2)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x, t):
        h = torch.cat([x, t[:, None]], 1).to(self.lin.weight.dtype)
        return self.drop(self.lin(h)).float()


def _twice(first, second, **kw):
    """The graphed result of a call after another configuration ran, the graphs captured, and the eager result."""
    net = _DropoutNet()
    score = sf.adapters.from_eps(net, SDE)
    kw = dict(sampler="ddim", steps=8, seed=1, **kw)
    with torch.no_grad(), graphs.emulated() as stats:
        first(net)
        _graphed(score, **kw)
        second(net)
        out = _graphed(score, **kw)
    with torch.no_grad():
        return out, stats.graphs, sf.sample(score, SDE, (12, 2), **kw)


@pytest.mark.parametrize(
    "first,second",
    [
        (lambda net: net.train(), lambda net: net.eval()),
        (lambda net: net.eval(), lambda net: net.to(torch.bfloat16)),
        (lambda net: net.eval(), lambda net: net.half().float()),  # new storage, the same dtype
    ],
    ids=["train-eval", "to-bf16", "half-float"],
)
def test_a_module_mode_or_storage_change_is_another_configuration(first, second):
    """``.train()`` / ``.eval()`` of any reachable module, and ``.to()`` / ``.half()`` (which swap the storage
    under the same parameter objects) change what a graph computes or reads."""
    out, captured, eager = _twice(first, second)
    assert captured == 2
    assert torch.equal(out, eager), (out - eager).abs().max()


@pytest.mark.parametrize(
    "ambient",
    [
        lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        torch.inference_mode,
    ],
    ids=["autocast-bf16", "inference-mode"],
)
def test_ambient_autocast_and_inference_mode_are_part_of_the_configuration(ambient):
    """A graph captured under an autocast or inference mode is not replayed by a call outside it (and back)."""
    net = _DropoutNet().eval()
    score = sf.adapters.from_eps(net, SDE)
    kw = dict(sampler="euler_maruyama", steps=8, seed=1)
    with torch.no_grad():
        eager = sf.sample(score, SDE, (12, 2), **kw)
        with ambient():
            inside = sf.sample(score, SDE, (12, 2), **kw)
        with graphs.emulated() as stats:
            with ambient():
                _graphed(score, **kw)
            plain = _graphed(score, **kw)
            with ambient():
                again = _graphed(score, **kw)
    assert stats.graphs == 2
    assert torch.equal(plain, eager) and torch.equal(again, inside)
    assert ambient is torch.inference_mode or not torch.equal(plain, inside)  # autocast changes the samples


def test_a_nested_run_of_the_same_configuration_leaves_the_outer_non_finite_step():
    """A callback sampling the cached configuration after the outer run's graphed loop: the outer run's
    non-finite flag is its own (not the entry's, which the inner run rewrites), so it names its step."""

    def score(x, t, poison):
        s = GM.score(x, t, SDE)
        bad = (poison[:, None] > 0) & (t[:, None] < 0.5) & (t[:, None] > 0.4)
        return torch.where(bad, torch.full_like(s, float("inf")), s)

    kw = dict(sampler="pc", steps=10, seed=0, shape=(4, 2), schedule="uniform")  # t_5 = 0.445

    def run(poison, callback=None, graphed=True):
        call = _graphed if graphed else lambda score, **kw: sf.sample(score, SDE, kw.pop("shape"), **kw)
        with pytest.raises(sf.NonFiniteError) if poison.any() else contextlib.nullcontext() as err:
            call(score, extra_args={"poison": poison}, callback=callback, **kw)
        return err

    def callback(info):
        if info["i"] == 9:
            run(torch.zeros(4), callback=lambda info: None)  # the same configuration (with a callback too)

    eager = run(torch.ones(4), callback, graphed=False)
    with graphs.emulated():
        run(torch.zeros(4), callback=lambda info: None)  # cached
        graphed = run(torch.ones(4), callback)
    assert "at step 5 " in str(eager.value)
    assert str(graphed.value) == str(eager.value)


def test_a_run_in_another_thread_does_not_share_the_entry_in_use():
    """Thread A takes the cached entry and is held in its warm-up step (a network releasing the GIL);
    thread B, running the same configuration meanwhile, must not replay A's entry: it captures its own."""
    in_warm_up, b_done = threading.Event(), threading.Event()

    def score(x, t):
        if threading.current_thread().name == "A" and not in_warm_up.is_set():
            in_warm_up.set()
            assert b_done.wait(60)
        return GM.score(x, t, SDE)

    kw = dict(sampler="euler_maruyama", steps=12)
    out = {}

    def run(seed):
        out[seed] = sf.sample(score, SDE, (8, 2), seed=seed, cuda_graph=True, **kw)

    with graphs.emulated() as stats:
        run(0)  # cached
        a = threading.Thread(target=run, args=(1,), name="A")
        a.start()
        assert in_warm_up.wait(60)
        try:
            run(2)  # B, in this thread
        finally:
            b_done.set()
            a.join(60)
    assert stats.graphs == 2  # B captured its own graph
    for seed in (1, 2):
        assert torch.equal(out[seed], sf.sample(score, SDE, (8, 2), seed=seed, **kw)), seed


def test_no_cache_captures_per_run_for_a_score_reading_host_values():
    """A host attribute read by the score is frozen in a cached graph (the documented limit); within
    ``no_cache()`` every run captures its own graph and sees the value of its call."""

    class Scaled:
        scale = 1.0

        def __call__(self, x, t):
            return self.scale * GM.score(x, t, SDE)

    score = Scaled()
    kw = dict(sampler="ddim", steps=8, seed=1)
    with graphs.emulated() as stats:
        first = _graphed(score, **kw)
        score.scale = 3.0
        frozen = _graphed(score, **kw)
        with sf.graphs.no_cache():
            fresh = _graphed(score, **kw)
            assert len(graphs._CACHE) == 1  # nor filled
    assert stats.graphs == 2
    eager = sf.sample(score, SDE, (12, 2), **kw)
    assert not torch.equal(frozen, eager)  # cached: the graphed steps keep the capture's scale
    assert torch.equal(fresh, eager) and not torch.equal(fresh, first)
