"""TrainStep without host syncs (DESIGN "The one-launch step and GPU truth", host reads) and the EMA:
one ``_foreach_lerp_`` per dtype group, its decay schedule from a device counter, checked arguments.

A host read is what a ``TorchDispatchMode`` sees as ``aten._local_scalar_dense`` (``.item()``,
``int()``, ``bool()``, ``float()`` of a tensor) or an op with a data-dependent output shape
(``nonzero``, ``masked_select``, ``unique``), plus ``tolist`` / ``numpy`` / a CUDA synchronize,
patched at the Python level.  On a GPU each of these waits for the device.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import scorefast as sf
from scorefast import _checks, losses, models
from scorefast.sde import VESDE, VPSDE, SubVPSDE
from scorefast.train import EMA, TrainStep
from scorefast.train import ema as ema_module
from scorefast.train import step as step_module
from tests.conftest import backend_params

SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "equal"}


class HostReads(TorchDispatchMode):
    """Records every host read (see the module docstring) as (op, the tensor read)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.reads: list[tuple[str, torch.Tensor | None]] = []
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._python_read(name, original))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: self.reads.append(("synchronize", None)))

    def _python_read(self, name, original):
        def read(tensor, *args, **kwargs):
            self.reads.append((name, tensor))
            return original(tensor, *args, **kwargs)

        return read

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNCING:
            self.reads.append((func.overloadpacket.__name__, args[0] if args else None))
        return func(*args, **(kwargs or {}))


def _model(seed=0, hidden=16):
    torch.manual_seed(seed)
    return models.build("MLP", dim=2, hidden=hidden, layers=2)


def _batch(n, B=16):
    return torch.randn(B, 2, generator=torch.Generator().manual_seed(100 + n))


def _device_state_step(model, **kw):
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-2), fused=True)  # reads nothing on CPU
    args = dict(
        sde=VPSDE(),
        ema=EMA(model, decay=0.99, warmup=3),
        warmup=5,
        grad_clip=0.5,
        accumulate=2,
        check_every=3,
        device_state=True,
    )
    args.update(kw)
    return TrainStep(model, opt, "dsm", **args)


@pytest.mark.parametrize("parameterisation", ["eps", "score"])
@pytest.mark.parametrize("backend", backend_params())
def test_an_eager_step_reads_the_device_only_at_its_checks(backend, parameterisation, monkeypatch):
    """device_state=True, check_every=3: steps between checks read nothing; a check reads the flag once.

    The cpu backend's kernels take the 0-d step counter by value (a CPU read of CPU memory); the
    cuda backend reads it through its pointer, which the emulated run of this test checks with
    no allowance at all, as does the torch reference."""
    monkeypatch.setenv("SCOREFAST_BACKEND", backend)
    ts = _device_state_step(_model(), parameterisation=parameterisation)
    allowed = {ts._step_t.data_ptr()} if backend == "cpu" else set()
    per_step = []
    with HostReads(monkeypatch) as mode:
        for n in range(7):  # lr warmup (5 steps) and EMA warmup tables, then lr fixed
            before = len(mode.reads)
            ts(_batch(n))
            reads = [(op, t) for op, t in mode.reads[before:] if t is None or t.data_ptr() not in allowed]
            per_step.append(reads)
    for n, reads in enumerate(per_step):
        if (n + 1) % 3:
            assert reads == [], f"step {n} read the device: {[op for op, _ in reads]}"
        else:  # the check: one read, of the non-finite flag
            assert len(reads) == 1 and reads[0][1].data_ptr() == ts._first_bad.data_ptr(), reads
    assert ts.step == 7 and int(ts._step_t) == 7 and ts.ema.state_dict()["num_updates"] == 7


def test_the_step_reads_nothing_through_the_public_checks(monkeypatch):
    """Ids the package made are not re-validated: no check_sample_ids / check_counter call in a step."""
    ts = _device_state_step(_model())
    ts(_batch(0))
    for name in ("check_sample_ids", "check_counter", "check_coef"):
        monkeypatch.setattr(_checks, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} called in a step"))
    for n in range(1, 4):
        ts(_batch(n))


def test_micro_batch_ids_are_made_once_per_rank_and_refused_past_2_32(monkeypatch):
    ts = _device_state_step(_model())
    first = ts.micro_batch_ids(1, 16, "cpu")
    assert ts.micro_batch_ids(1, 16, torch.device("cpu")) is first  # made once, reused
    assert torch.equal(first, torch.arange(16, 32))
    monkeypatch.setattr(step_module, "rank_and_world", lambda: (3, 4))
    # rank r, micro-batch m of A = 2, local batch b: (r A + m) b + arange(b)
    assert torch.equal(ts.micro_batch_ids(1, 16, "cpu"), torch.arange((3 * 2 + 1) * 16, (3 * 2 + 1) * 16 + 16))
    monkeypatch.setattr(step_module, "rank_and_world", lambda: (2**31, 2**31 + 1))
    with pytest.raises(ValueError, match="x: sample ids"):
        ts.micro_batch_ids(0, 16, "cpu")


@pytest.mark.parametrize("check_every", [0, 5])
def test_deferred_checks_name_the_first_bad_step_across_folds(check_every, tmp_path):
    """Eager steps keep their losses and fold them into the device flag every FOLD_EVERY steps or at
    a check: the first non-finite step is named whether it falls before or after a fold."""
    bad_steps = {step_module.FOLD_EVERY + 6, step_module.FOLD_EVERY + 9}

    def loss(score_fn, x, sde, *, seed, step, sample_ids):
        value = sf.losses.dsm_loss(
            score_fn, x, sde, seed=seed, step=step, sample_ids=sample_ids, return_per_sample=True
        )
        return value * (float("nan") if int(step) in bad_steps else 1.0)

    model = _model()
    ts = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), loss, sde=VPSDE(), check_every=check_every)
    first = min(bad_steps)
    for n in range(first):  # a fold (and with K = 5, checks) before the first bad step: nothing flagged
        ts(_batch(n % 4))
    assert int(ts._first_bad) == -1
    if check_every:
        for n in range(first, first + 4):  # steps first .. first+3; the check after step first+3 raises
            ts(_batch(n % 4))
        with pytest.raises(sf.NonFiniteError, match=f"training step {first}"):
            ts(_batch(0))
    else:
        for n in range(first, first + 10):
            ts(_batch(n % 4))
        ts.save(tmp_path / "s.safetensors")  # the save folds the pending losses into the flag it stores
        with pytest.raises(sf.NonFiniteError, match=f"training step {first}"):
            ts.check()
        again = TrainStep(_model(), torch.optim.SGD(_model().parameters(), lr=0.0), loss, sde=VPSDE(), check_every=0)
        again.load(tmp_path / "s.safetensors")
        with pytest.raises(sf.NonFiniteError, match=f"training step {first}"):
            again.check()


def test_after_warmup_the_step_leaves_the_learning_rate_alone():
    """Warmup sets lr_n for n < warmup only; a learning rate the user sets afterwards is kept (it was
    overwritten with the base rate at every step)."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    ts = TrainStep(model, opt, sde=VPSDE(), warmup=2)
    for n in range(3):
        ts(_batch(n))
    assert opt.param_groups[0]["lr"] == 0.1
    opt.param_groups[0]["lr"] = 0.5
    ts(_batch(3))
    assert opt.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_training_times_are_the_contract_float64_uniforms(backend):
    """t from fp32 uniforms widened to float64 equals the float64 reference draw bit for bit."""
    if not sf.backends.state(backend).available:
        pytest.skip(f"{backend} backend not built")
    ids = torch.arange(5, 5 + 300)
    sde = VPSDE()
    got = losses._times(sde, 300, eps=1e-5, seed=2**63 + 11, step=torch.tensor(7), sample_ids=ids, backend=backend)
    u = sf.rand((300, 1), seed=2**63 + 11, step=7, stream=4, sample_ids=ids, dtype=torch.float64, backend="torch")
    assert got.dtype == torch.float64 and torch.equal(got, u[:, 0] * (sde.T - 1e-5) + 1e-5)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(0.2, 15.0), VESDE(), sf.sde.EDM()], ids=["vp", "subvp", "ve", "edm"])
def test_the_loss_mean_and_std_are_the_sdes_own_bit_for_bit(sde):
    """The perturbation's (mean_coef, std), computed with one log_mean_coeff for VP and sub-VP, equal the
    SDE's own methods bit for bit (a formula that drifted from the SDE's would fail)."""
    t = torch.rand(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * (1 - 1e-5) + 1e-5
    a, s = losses._mean_std(sde, t)
    assert torch.equal(a, sde.mean_coef(t)) and torch.equal(s, sde.std(t))


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_eps_residual_equals_the_score_residual_in_value_and_gradients(sde):
    """The eps path (std s + z = z - eps) and the score path (s = -eps / std) give the same loss and
    parameter gradients within fp32 rounding."""
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    step = torch.tensor(9)
    ids = torch.arange(64)
    results = []
    for path in ("eps", "score"):
        model = _model(hidden=32)
        score_fn = sf.adapters.from_eps(model, sde)
        kw = dict(seed=5, step=step, sample_ids=ids, likelihood_weighting=False, reduce_mean=False, eps=1e-5)
        if path == "eps":
            kw["eps_net"] = (model, sf.adapters.resolve_time_map(sde, None))
        per = losses.dsm_per_sample(score_fn, x, sde, backend="cpu", **kw)
        per.mean().backward()
        results.append((per.detach(), [p.grad.clone() for p in model.parameters()]))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)
    for p, q in zip(ga, gb):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def _autograd_eps_dsm(model, time_map, **options):
    """The eps network's DSM through autograd (``dsm_per_sample(..., eps_net=...)``): the reference the
    step's own backward-from-the-output path must equal."""

    def loss(score_fn, x, sde, *, seed, step, sample_ids):
        return losses.dsm_per_sample(
            score_fn, x, sde, seed=seed, step=step, sample_ids=sample_ids, likelihood_weighting=False,
            backend=sf.backends.resolve(None, x.device, x.dtype), eps_net=(model, time_map), **options,
        )  # fmt: skip

    return loss


@pytest.mark.parametrize(
    "precision,accumulate,reduce_mean,dtype,B",
    [
        ("fp32", 1, False, torch.float32, 16),
        ("fp32", 1, False, torch.float32, 24),  # 1 / 12: a mean that rounds
        ("fp32", 3, True, torch.float32, 18),
        ("fp32", 2, True, torch.float64, 20),
        ("bf16", 2, False, torch.float32, 12),
        ("fp16", 1, True, torch.float32, 20),
        ("fp16", 3, False, torch.float32, 18),
    ],
)
def test_the_eps_dsm_step_equals_the_autograd_loss_bit_for_bit(precision, accumulate, reduce_mean, dtype, B):
    """The eps network's DSM backpropagates from the network's output (d loss / d out = -2 c r, c made
    as autograd makes it: GradScaler scale, / A, / b, / D): losses, weights, EMA, optimizer state and
    the GradScaler equal the autograd path's bit for bit, through warmup and clipping."""
    runs = []
    for fast in (True, False):
        model = _model(hidden=32).to(dtype)
        sde = VPSDE()
        time_map = sf.adapters.resolve_time_map(sde, None)
        opt = torch.optim.Adam(model.parameters(), lr=3e-2)
        kw = dict(sde=sde, precision=precision, ema=0.9, warmup=3, grad_clip=0.05, accumulate=accumulate)
        if fast:
            ts = TrainStep(model, opt, "dsm", loss_kwargs={"reduce_mean": reduce_mean}, **kw)
            assert ts._eps_dsm is not None
        else:
            ts = TrainStep(model, opt, _autograd_eps_dsm(model, time_map, reduce_mean=reduce_mean, eps=1e-5), **kw)
            assert ts._eps_dsm is None
        got = [ts(_batch(n, B).to(dtype)) for n in range(6)]
        runs.append((got, ts))
    (la, a), (lb, b) = runs
    assert all(torch.equal(p, q) for p, q in zip(la, lb)), (la, lb)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(a.ema.shadow, b.ema.shadow):
        assert torch.equal(p, q)
    assert torch.equal(a.last_grad_norm, b.last_grad_norm)
    if precision == "fp16":
        assert torch.equal(a.scaler._scale, b.scaler._scale)


# -- EMA --------------------------------------------------------------------------------------
class _Mixed(torch.nn.Module):
    """n fp32 and n ``low`` (bf16, float64, ...) parameters plus a float buffer: two dtype groups."""

    def __init__(self, n: int, low: torch.dtype = torch.bfloat16):
        super().__init__()
        self.a = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(3, 5)) for _ in range(n))
        self.b = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(7).to(low)) for _ in range(n))
        self.register_buffer("stat", torch.randn(4))


def _ops_of(fn) -> list[str]:
    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    names: list[str] = []
    with Ops():
        fn()
    return names


@pytest.mark.parametrize("device_counter,warmup", [(False, 0), (False, 5), (True, 0), (True, 5)])
def test_ema_update_is_one_foreach_lerp_per_dtype_group(device_counter, warmup):
    """However many tensors, an update is the same few ops: one _foreach_lerp_ per dtype group (and,
    with a device counter in warmup, a table lookup), never a per-tensor loop."""
    counts = []
    for n in (2, 20):
        torch.manual_seed(0)
        ema = EMA(_Mixed(n), decay=0.9, warmup=warmup)
        if device_counter:
            ema.use_device_counter()
        ops = _ops_of(ema.update)
        assert ops.count("_foreach_lerp_") == 2, ops
        counts.append(len(ops))
    assert counts[0] == counts[1]


def _reference(decay, warmup, shadow, live, n):
    """One update of the float64 per-parameter reference loop, DESIGN's rule."""
    d = min(decay, (1 + n) / (1 + n + warmup))
    return [d * s + (1 - d) * p for s, p in zip(shadow, live)]


def _perturb_(model, gen):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def test_ema_matches_the_float64_per_parameter_reference():
    """float64 parameters: 40 updates (through the warmup and past saturation) within 1e-14 of the
    reference d s + (1 - d) p.  Not bitwise: lerp computes s + (1 - d)(p - s) (a fused multiply-add
    on vector lanes), another rounding of the same value; a decay 1e-9 off fails."""
    decay, warmup = 0.8, 3  # d saturates at update 12
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).double()
    ema = EMA(model, decay=decay, warmup=warmup)
    ref = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(1)
    for n in range(40):
        _perturb_(model, gen)
        ema.update()
        ref = _reference(decay, warmup, ref, [p.detach() for p in model.parameters()], n)
        for s, r in zip(ema.shadow, ref):
            assert (s - r).abs().max() <= 1e-14 * max(1.0, r.abs().max())
    off = _reference(decay + 1e-9, warmup, ref, [p.detach() for p in model.parameters()], 40)
    ema.update()
    assert max((s - r).abs().max() for s, r in zip(ema.shadow, off)) > 1e-14


def test_ema_fp32_and_bf16_updates_are_within_their_rounding_of_the_reference():
    """Each update from the same state: within 2 ulp of max(|s|, |p|) of the float64 reference (lerp
    rounds its difference, product and sum: at most 2 ulp), for fp32 and for bf16 tensors."""
    torch.manual_seed(0)
    model = _Mixed(3)
    ema = EMA(model, decay=0.9, warmup=4)
    gen = torch.Generator().manual_seed(2)
    for n in range(12):
        _perturb_(model, gen)
        before = [s.double() for s in ema.shadow]
        live = [t.detach().double() for t in ema._live]
        ema.update()
        for s, r, b, p in zip(ema.shadow, _reference(0.9, 4, before, live, n), before, live):
            ulp = torch.finfo(s.dtype).eps * torch.maximum(b.abs(), p.abs())
            assert ((s.double() - r).abs() <= 2 * ulp).all()


@pytest.mark.parametrize("captured", [False, True], ids=["eager", "after-capture"])
@pytest.mark.parametrize("max_table", [ema_module.MAX_TABLE, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_ema_device_counter_equals_the_host_path(dtype, max_table, captured, monkeypatch):
    """The decay schedule from a device counter (a device table, or computed when too long to
    tabulate) gives the host path's shadow bit for bit on fp32 and float64 tensors, through
    saturation and a state round trip.  bf16/fp16 tensors: lerp rounds a tensor weight to the
    tensor's dtype, a host number it keeps in fp32, so there an update agrees within one ulp of
    max(|shadow|, |live|)."""
    monkeypatch.setattr(ema_module, "MAX_TABLE", max_table)
    torch.manual_seed(0)
    host_model = _Mixed(2, dtype)
    dev_model = _Mixed(2, dtype)
    dev_model.load_state_dict(host_model.state_dict())
    host, dev = EMA(host_model, decay=0.75, warmup=3), EMA(dev_model, decay=0.75, warmup=3)  # saturates at 8
    dev.use_device_counter()
    dev._captured = captured  # after a capture the weight always comes from the device counter
    gen = torch.Generator().manual_seed(3)
    for n in range(14):
        _perturb_(host_model, gen)
        dev_model.load_state_dict(host_model.state_dict())
        if dtype != torch.float64:  # bf16: compare one update from the same state
            torch._foreach_copy_(dev.shadow, host.shadow)
        scale = [torch.maximum(s.double().abs(), p.double().abs()) for s, p in zip(host.shadow, host._live)]
        host.update()
        dev.update()
        for a, b, m in zip(host.shadow, dev.shadow, scale):
            if a.dtype in (torch.float32, torch.float64):
                assert torch.equal(a, b)
            else:  # the weight rounded to bf16 (2**-9 relative) moves the result by at most one ulp of m
                assert ((a.double() - b.double()).abs() <= torch.finfo(a.dtype).eps * m).all()
        if n == 5:
            restored = EMA(_Mixed(2, dtype), decay=0.5)
            restored.use_device_counter()
            restored.load_state_dict(dev.state_dict())
            assert int(restored._updates_t) == 6 and restored.decay == 0.75 and restored.warmup == 3


def test_ema_after_a_capture_takes_the_decay_from_the_device_counter(monkeypatch):
    """Eagerly, before any capture, the counters agree and an fp32 warmup update takes the host number
    (no table op); once an update was captured, replays count on the device only, so a later eager
    update takes d from the device counter, not from the host's stale count."""
    decay, warmup = 0.9, 5
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=decay, warmup=warmup)
    ema.use_device_counter()
    assert "take" not in _ops_of(ema.update)  # eager, fp32, warmup: the host number
    monkeypatch.setattr(_checks, "is_capturing_or_compiling", lambda: True)
    ema.update()  # "captured": from here on the device counter rules
    monkeypatch.undo()
    ema._updates_t += 3  # what three replays do; the host still counts 2 updates
    with torch.no_grad():
        model.weight.add_(1.0)
    before = [s.double() for s in ema.shadow]
    ema.update()
    want = _reference(decay, warmup, before, [t.detach().double() for t in ema._live], 5)
    for s, r in zip(ema.shadow, want):
        torch.testing.assert_close(s.double(), r, rtol=0, atol=4e-7)
    stale = _reference(decay, warmup, before, [t.detach().double() for t in ema._live], 2)
    assert max((s.double() - r).abs().max() for s, r in zip(ema.shadow, stale)) > 1e-3


def test_ema_state_dict_counts_updates_made_on_the_device():
    """Under graph replays the host counter does not advance: state_dict reports the device counter."""
    ema = EMA(_model(), decay=0.9, warmup=2)
    ema.use_device_counter()
    ema.update()
    ema._updates_t += 4  # what four replays of a captured update do
    assert ema.state_dict()["num_updates"] == 5


@pytest.mark.parametrize(
    "key,value,error",
    [
        ("decay", 7, ValueError),
        ("decay", -0.1, ValueError),
        ("decay", 1.0, ValueError),
        ("decay", float("nan"), ValueError),
        ("decay", True, ValueError),
        ("decay", "0.9", ValueError),
        ("warmup", -1, ValueError),
        ("warmup", 2.5, ValueError),
        ("warmup", True, ValueError),
        ("num_updates", -3, ValueError),
        ("num_updates", 1.5, ValueError),
        ("shadow", "weights", ValueError),
        ("shadow", "one short", ValueError),
        ("shadow", "wrong shape", ValueError),
        ("shadow", "int tensor", ValueError),
    ],
)
def test_ema_load_state_dict_refuses_a_bad_entry_by_name(key, value, error):
    model = _model()
    ema = EMA(model, decay=0.9)
    state = ema.state_dict()
    if key == "shadow":
        shadow = state["shadow"]
        value = {
            "weights": "weights",
            "one short": shadow[:-1],
            "wrong shape": [t[..., :1] if t.dim() else t for t in shadow],
            "int tensor": [t.long() for t in shadow],
        }[value]
    before = [t.clone() for t in ema.shadow]
    with pytest.raises(error, match=key):
        ema.load_state_dict({**state, key: value})
    assert ema.decay == 0.9 and ema.warmup == 0 and all(torch.equal(a, b) for a, b in zip(before, ema.shadow))
    with pytest.raises(ValueError, match="missing num_updates"):
        ema.load_state_dict({k: v for k, v in state.items() if k != "num_updates"})
    with pytest.raises(TypeError, match="state"):
        ema.load_state_dict([("decay", 0.9)])


def test_ema_takes_any_real_decay_in_range_and_refuses_bool_warmup():
    model = _model()
    assert EMA(model, decay=np.float32(0.5)).decay == 0.5
    for bad in (True, 1.5, -1):
        with pytest.raises(ValueError, match="warmup"):
            EMA(model, decay=0.9, warmup=bad)
    assert math.isclose(EMA(model, decay=0.99, warmup=np.int64(3)).current_decay(), 1 / 4)


def test_train_step_refuses_bad_arguments_by_name():
    """The same class as a string for a bool or an unhashable name: each refused, naming the argument,
    at construction (not as a raw error, a silent truthiness, or an error at the first step)."""
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    cases = [
        (dict(precision=["fp32"]), ValueError, "precision"),
        (dict(parameterisation=["eps"]), TypeError, "parameterisation"),
        (dict(skip_nonfinite="yes"), TypeError, "skip_nonfinite"),
        (dict(device_state="no"), TypeError, "device_state"),
        (dict(loss_kwargs=[("eps", 1e-3)]), TypeError, "loss_kwargs"),
        (dict(loss_kwargs={"bogus": 1}), ValueError, "loss_kwargs"),
        (dict(loss_kwargs={"return_per_sample": False}), ValueError, "loss_kwargs"),
        (dict(loss_kwargs={"reduce_mean": "no"}), TypeError, "loss_kwargs"),
        (dict(loss_kwargs={"eps": -1.0}), ValueError, "eps"),
        (dict(ema=7), ValueError, "decay"),
        (dict(ema="0.99"), TypeError, "ema"),
        (dict(grad_clip=float("nan")), ValueError, "grad_clip"),
        (dict(check_every=2.0), ValueError, "check_every"),
        (dict(accumulate=True), ValueError, "accumulate"),
    ]
    for kwargs, error, name in cases:
        with pytest.raises(error, match=name):
            TrainStep(model, opt, "dsm", sde=VPSDE(), **kwargs)
    with pytest.raises(ValueError, match="loss_kwargs"):
        TrainStep(model, opt, "edm", sde=sf.sde.EDM(), loss_kwargs={"likelihood_weighting": True})
    TrainStep(model, opt, "dsm", sde=VPSDE(), ema=np.float64(0.9), loss_kwargs={"reduce_mean": True, "eps": 1e-3})


def test_the_training_bench_suite_runs_both_loops(tmp_path):
    """``scorefast bench --suite cpu-train --quick``: TrainStep and score_sde's loop timed in one run,
    the same-run ratio derived, the README table printed; ``--out`` a folder writes cpu-train.json there."""
    from tests.test_cli import _quick_bench

    data, stdout = _quick_bench("cpu-train", tmp_path)
    assert (tmp_path / "cpu-train.json").is_file()
    rows = {r["role"]: r for r in data["results"]}
    assert rows["eager"]["group"] == rows["fused"]["group"] and rows["eager"]["peer"].startswith("score_sde")
    assert rows["fused"]["ratio_vs_eager"] > 0 and rows["fused"]["ratio_paired"] > 0 and rows["fused"]["steps"] > 0
    assert rows["fused"]["goal"] is True and rows["fused"]["model"] == "toy2d-mlp (goal)"
    assert "| sf.train.TrainStep, Adam(fused=True) | toy2d-mlp (goal) | 64 | 1 |" in stdout
    assert "vs peer: paired" in stdout
    assert "Goal (1.2x the peer by the paired ratio on every goal row): " in stdout


def test_the_training_goal_line_is_the_goal_rows_verdict():
    """The README's verdict under the cpu-train table comes from the goal rows' paired ratios alone."""
    from scorefast.bench import train_table

    def row(ratio, goal=True, threads=1):
        return dict(name="sf.train.TrainStep, Adam()", model="m", size=64, threads=threads, median_s=1e-3, steps=1,
                    ratio_paired=ratio, goal=goal, optimizer="Adam()")  # fmt: skip

    results = {"suite": "cpu-train", "date": "2026-12-02", "machine": {"cpu": "c", "gpu": None, "torch": "t"}}
    met = train_table(results | {"results": [row(1.25), row(1.21, threads=2), row(0.5, goal=False)]})
    assert "every goal row): met; 2 of 2 goal rows reach it, the lowest at 1.210x (Adam(), batch 64, 2 threads)." in met
    missed = train_table(results | {"results": [row(1.25), row(1.1996, threads=2)]})
    assert "**not met**; 1 of 2 goal rows reach it, the lowest at 1.199x" in missed
    assert "Goal" not in train_table(results | {"results": [row(1.3, goal=False)]})
