"""TrainStep (precision, clipping, warmup, EMA, exact resume, bad input), the fused DSM backward,
SSM's JVP path, ``fit`` / ``scorefast train`` and the shipped digits model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import scorefast as sf
from scorefast import models
from scorefast.sde import EDM, VESDE, VPSDE, DiscreteVP, SubVPSDE
from scorefast.train import EMA, TrainStep
from scorefast.train.fit import fit, make_model

ROOT = Path(__file__).resolve().parents[1]


def _mlp(seed=0, dim=2):
    torch.manual_seed(seed)
    return models.build("MLP", dim=dim, hidden=16, layers=2)


def _step(seed=0, *, precision="fp32", **kw):
    model = _mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=kw.pop("lr", 1e-2))
    return TrainStep(model, opt, kw.pop("loss", "dsm"), sde=kw.pop("sde", VPSDE()), precision=precision, **kw)


def _batch(step):
    return torch.randn(32, 2, generator=torch.Generator().manual_seed(100 + step))


def _params(ts):
    return [p.detach().clone() for p in ts.model.parameters()]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_resume_is_exact(tmp_path, precision):
    """5 steps + save + load into fresh objects + 5 steps == 10 uninterrupted steps, bitwise."""
    kw = dict(precision=precision, ema=0.9, warmup=4, grad_clip=0.5)
    a = _step(**kw)
    for n in range(10):
        a(_batch(n))
    b = _step(**kw)
    for n in range(5):
        b(_batch(n))
    b.save(tmp_path / "state.safetensors")
    c = _step(seed=123, **kw)  # different initial weights: everything must come from the file
    c.load(tmp_path / "state.safetensors")
    assert c.step == 5
    for n in range(5, 10):
        c(_batch(n))
    for p, q in zip(_params(a), _params(c)):
        assert torch.equal(p, q)
    for p, q in zip(a.ema.shadow, c.ema.shadow):
        assert torch.equal(p, q)
    assert a.optimizer.param_groups[0]["lr"] == c.optimizer.param_groups[0]["lr"]
    if precision == "fp16":
        assert a.scaler is not None and a.scaler.get_scale() == c.scaler.get_scale()


def test_warmup_schedule_and_clipping():
    ts = _step(warmup=4, grad_clip=1e-3, lr=0.1)
    lrs = []
    for n in range(6):
        ts(_batch(n))
        lrs.append(ts.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    assert ts.last_grad_norm is not None and float(ts.last_grad_norm) > 1e-3  # the clip was active
    # with clipping, the global gradient norm the optimizer saw is the clip value
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = _params_of(model)
    TrainStep(model, opt, "dsm", sde=VPSDE(), grad_clip=1e-3)(_batch(0))
    moved = math.sqrt(sum(float(((p - q) ** 2).sum()) for p, q in zip(_params_of(model), before)))
    assert moved == pytest.approx(1e-3, rel=1e-4)


def _params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def test_step_uses_the_declared_streams_and_ids():
    """The step's loss is dsm_loss at Philox step n with micro-batch ids (m b + arange(b))."""
    ts = _step(accumulate=2, lr=0.0)
    x = _batch(0)
    got = ts(x)
    with torch.no_grad():
        parts = [
            sf.losses.dsm_loss(
                ts.score_fn,
                x[m * 16 : (m + 1) * 16],
                VPSDE(),
                seed=0,
                step=0,
                sample_ids=torch.arange(m * 16, (m + 1) * 16),
            )
            for m in range(2)
        ]
    torch.testing.assert_close(got, (parts[0] + parts[1]) / 2, rtol=1e-6, atol=1e-6)
    assert ts.step == 1


def test_fp16_uses_a_grad_scaler_and_bf16_trains():
    for precision in ("fp16", "bf16"):
        ts = _step(precision=precision, lr=3e-3)
        assert (ts.scaler is not None) == (precision == "fp16")
        first = sum(float(ts(_batch(n % 4))) for n in range(4))
        for n in range(60):
            ts(_batch(n % 4))
        last = sum(float(ts(_batch(n % 4))) for n in range(4))
        assert math.isfinite(last) and last < first


def test_nonfinite_loss_names_the_step_or_is_skipped():
    calls = {"n": 0}

    def loss(score_fn, x, sde, *, seed, step, sample_ids):
        calls["n"] += 1
        value = sf.losses.dsm_loss(
            score_fn, x, sde, seed=seed, step=step, sample_ids=sample_ids, return_per_sample=True
        )
        return value * (float("nan") if step == 2 else 1.0)

    ts = _step(loss=loss)
    ts(_batch(0))
    ts(_batch(1))
    with pytest.raises(sf.NonFiniteError, match="training step 2"):
        ts(_batch(2))
    deferred = _step(loss=loss, check_every=0)  # no host read in the loop: the flag keeps the first bad step
    for n in range(4):
        deferred(_batch(n))
    with pytest.raises(sf.NonFiniteError, match="training step 2"):
        deferred.check()
    every3 = _step(loss=loss, check_every=3)
    every3(_batch(0))
    every3(_batch(1))
    with pytest.raises(sf.NonFiniteError, match="training step 2"):
        every3(_batch(2))
    with pytest.raises(ValueError, match="check_every"):
        _step(check_every=-1)
    skip = _step(loss=loss, skip_nonfinite=True)
    for n in range(4):
        skip(_batch(n))
    assert skip.skipped == 1 and skip.step == 4
    assert all(torch.isfinite(p).all() for p in skip.model.parameters())


def test_bad_input():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="loss: 'edm'"):
        TrainStep(model, opt, "edm", sde=VPSDE())
    with pytest.raises(ValueError, match="loss: 'dsm'"):
        TrainStep(model, opt, "dsm", sde=DiscreteVP.linear(N=10))
    with pytest.raises(ValueError, match="loss: expected"):
        TrainStep(model, opt, "l2", sde=VPSDE())
    with pytest.raises(ValueError, match="precision"):
        TrainStep(model, opt, sde=VPSDE(), precision="int8")
    with pytest.raises(ValueError, match="grad_clip"):
        TrainStep(model, opt, sde=VPSDE(), grad_clip=-1.0)
    with pytest.raises(ValueError, match="warmup"):
        TrainStep(model, opt, sde=VPSDE(), warmup=-3)
    with pytest.raises(ValueError, match="decay"):
        TrainStep(model, opt, sde=VPSDE(), ema=1.5)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=0.0)
    with pytest.raises(TypeError, match="optimizer"):
        TrainStep(model, "adam", sde=VPSDE())
    with pytest.raises(ValueError, match="no parameters"):
        TrainStep(torch.nn.Identity(), opt, sde=VPSDE())
    with pytest.raises(ValueError, match="variance-preserving"):
        TrainStep(model, opt, sde=VESDE(), parameterisation="v")
    ts = TrainStep(model, opt, sde=VPSDE(), accumulate=3)
    with pytest.raises(ValueError, match="accumulate=3"):
        ts(torch.randn(8, 2))
    with pytest.raises(TypeError, match="x"):
        ts(torch.ones(6, 2, dtype=torch.int64))


def test_resume_refuses_a_changed_setting(tmp_path):
    a = _step(warmup=2)
    a(_batch(0))
    a.save(tmp_path / "s.safetensors")
    b = _step(warmup=2, seed=0)
    b.seed = 7
    with pytest.raises(ValueError, match="seed: the checkpoint was trained with 0"):
        b.load(tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="warmup"):
        _step(warmup=3).load(tmp_path / "s.safetensors")
    (tmp_path / "junk").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable training state"):
        _step(warmup=2).load(tmp_path / "junk")


@pytest.mark.parametrize(
    "sde,weighting,reduce_mean",
    [(VPSDE(), False, False), (VESDE(), True, True), (SubVPSDE(), True, False)],
    ids=["vp", "ve-lw-mean", "subvp-lw"],
)
def test_dsm_fused_backward_matches_autograd_reference(sde, weighting, reduce_mean):
    """Gradients through the regenerate-in-backward DSM equal float64 autograd of score_sde's formula."""
    torch.manual_seed(0)
    net = models.build("MLP", dim=3, hidden=8, layers=1).double()
    score_fn = sf.adapters.from_score(net, sde, time_map="t")
    x = torch.randn(17, 3, dtype=torch.float64)
    loss = sf.losses.dsm_loss(score_fn, x, sde, seed=5, step=3, likelihood_weighting=weighting, reduce_mean=reduce_mean)
    got = torch.autograd.grad(loss, list(net.parameters()))
    u = sf.rand((17, 1), seed=5, step=3, stream=4, dtype=torch.float64)[:, 0]
    t = u * (sde.T - 1e-5) + 1e-5
    z = sf.randn((17, 3), seed=5, step=3, stream=2, dtype=torch.float64)
    mean, std = sde.marginal_prob(x, t)
    s = score_fn(mean + std[:, None] * z, t)
    if weighting:
        per = torch.square(s + z / std[:, None]) * sde.sde(x, t)[1][:, None] ** 2
    else:
        per = torch.square(s * std[:, None] + z)
    ref = (per.mean(1) if reduce_mean else per.sum(1)).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    want = torch.autograd.grad(ref, list(net.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_edm_training_step_runs_with_edm_loss():
    torch.manual_seed(0)
    model = models.build("MLP", dim=2, hidden=16, layers=1, time_embedding="fourier")
    ts = TrainStep(model, torch.optim.Adam(model.parameters(), 1e-3), "edm", sde=EDM(), parameterisation="denoiser")
    assert math.isfinite(float(ts(_batch(0))))


class _NoForwardAD(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


def test_ssm_jvp_equals_vjp_in_value_and_parameter_gradients():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    x = torch.randn(11, 3, dtype=torch.float64)
    out = {}
    for ad in ("jvp", "vjp"):
        loss = sf.losses.ssm_loss(lambda y: net(y), x, n_projections=3, seed=1, step=2, ad=ad)
        out[ad] = (loss, torch.autograd.grad(loss, list(net.parameters())))
    torch.testing.assert_close(out["jvp"][0], out["vjp"][0], rtol=1e-12, atol=1e-12)
    for g, w in zip(out["jvp"][1], out["vjp"][1]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # a layer without forward AD: "auto" falls back to the VJP, "jvp" says why it cannot
    f = lambda y: net[2](_NoForwardAD.apply(net[0](y)))  # noqa: E731
    auto = sf.losses.ssm_loss(f, x, n_projections=3, seed=1, step=2, ad="auto")
    torch.testing.assert_close(auto, out["vjp"][0], rtol=1e-12, atol=1e-12)
    with pytest.raises(NotImplementedError, match="jvp"):
        sf.losses.ssm_loss(f, x, seed=1, step=2, ad="jvp")
    with pytest.raises(ValueError, match="ad:"):
        sf.losses.ssm_loss(f, x, ad="fwd")


def test_fit_resumes_to_the_same_weights(tmp_path):
    kw = dict(data="toy2d", batch=16, save_every=3, log_every=2, sample_grid=False)
    fit(tmp_path / "straight", steps=8, **kw)
    fit(tmp_path / "resumed", steps=5, **kw)
    summary = fit(tmp_path / "resumed", steps=8, **kw)
    assert summary["resumed_from"] == 5 and summary["steps"] == 8
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("train_state.safetensors", "loss.png", "summary.json"):
        assert (tmp_path / "resumed" / name).exists()
    _, sde, shape = models.load(tmp_path / "resumed" / "model.safetensors")
    assert shape == (2,) and isinstance(sde, VPSDE)


def _fit_interrupted_at_call_5(monkeypatch, out, **kw):
    """fit(out, **kw) with Ctrl-C at its 5th TrainStep call (after 4 finished steps)."""
    calls, real = {"n": 0}, TrainStep.__call__

    def flaky(self, x):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, x)

    monkeypatch.setattr(TrainStep, "__call__", flaky)
    with pytest.raises(KeyboardInterrupt):
        fit(out, **kw)
    monkeypatch.setattr(TrainStep, "__call__", real)


def test_fit_saves_what_it_computed_when_interrupted(tmp_path, monkeypatch):
    """An error mid-run still leaves the finished steps on disk; the rerun continues from there."""
    _fit_interrupted_at_call_5(monkeypatch, tmp_path, data="toy2d", steps=8, batch=8, save_every=100, sample_grid=False)
    assert fit(tmp_path, data="toy2d", steps=8, batch=8, save_every=100, sample_grid=False)["resumed_from"] == 4
    with pytest.raises(ValueError, match=r"batch: .* trained with 8"):
        fit(tmp_path, data="toy2d", steps=9, batch=16, save_every=100, sample_grid=False)
    with pytest.raises(ValueError, match="steps"):
        fit(tmp_path, data="toy2d", steps=0)
    with pytest.raises(ValueError, match="data"):
        fit(tmp_path / "x", data="cifar")


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    fit(out, data="toy2d", steps=1200, batch=256, save_every=1200, log_every=100, sample_grid=False)
    return out / "model.safetensors"


DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)]


def _toy_sw(checkpoint, device="cpu", **options):
    score_fn, sde, shape = models.load(checkpoint, device=device)
    gm = sf.testing.GaussianMixture.builtin()
    with torch.no_grad():
        x = sf.sample(score_fn, sde, (4000, *shape), sampler="ddim", steps=50, seed=3, device=device, **options)
    x = x.cpu()
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    return sf.testing.sliced_wasserstein(x, gm.sample(4000, seed=1).float())


@pytest.mark.slow
def test_training_learns_the_toy_mixture(toy_checkpoint):
    """End to end: fit() on the 2-D ring, then sample the saved EMA checkpoint: sliced-W near the floor."""
    gm = sf.testing.GaussianMixture.builtin()
    exact = gm.sample(4000, seed=1).float()
    floor = sf.testing.sliced_wasserstein(gm.sample(4000, seed=2).float(), exact)
    sde = sf.sde.VPSDE()
    standard_normal = sf.sample(lambda y, t: -y, sde, (4000, 2), sampler="ddim", steps=50)  # score of N(0, I)
    untrained = sf.testing.sliced_wasserstein(standard_normal, exact)
    got = _toy_sw(toy_checkpoint)
    assert got < 2.5 * floor < untrained, (got, floor, untrained)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_network_samples_match_fp32(toy_checkpoint, precision, device):
    """The network in bf16/fp16 (autocast), state and adapter arithmetic in fp32: the sample law moves
    by less than the Monte-Carlo floor of the sliced-Wasserstein estimate."""
    gm = sf.testing.GaussianMixture.builtin()
    floor = sf.testing.sliced_wasserstein(gm.sample(4000, seed=2).float(), gm.sample(4000, seed=1).float())
    low, full = _toy_sw(toy_checkpoint, device, precision=precision), _toy_sw(toy_checkpoint, device)
    assert abs(low - full) < floor


def test_shipped_digits_model_samples_look_like_digits():
    """The shipped checkpoint: a classifier trained on the real digits is as sure of its samples as
    of held-out real digits, and sees every class; noise and pixel-shuffled digits stay near 0.5."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    from sklearn.datasets import load_digits

    from scorefast.train.data import digits

    path = models.digits_checkpoint()
    meta = models.read_metadata(path)
    assert meta["arch"] == "UNet" and meta["shape"] == [1, 8, 8] and meta["trained_steps"] >= 5000
    real = digits().reshape(-1, 64).numpy()
    labels = load_digits().target
    clf = sklearn.LogisticRegression(max_iter=3000, C=0.1).fit(real[:1500], labels[:1500])
    held_out = clf.predict_proba(real[1500:]).max(1).mean()
    score_fn, sde, shape = models.load(path)
    assert sum(p.numel() for p in score_fn.net.parameters()) <= 500_000
    with torch.no_grad():
        x = sf.sample(score_fn, sde, (256, *shape), sampler="ddim", steps=50, seed=0).clamp(-1, 1)
    proba = clf.predict_proba(x.reshape(256, -1).numpy())
    counts = torch.bincount(torch.from_numpy(proba.argmax(1)), minlength=10)
    noise = clf.predict_proba(torch.randn(256, 64).clamp(-1, 1).numpy()).max(1).mean()
    assert proba.max(1).mean() > 0.85 * held_out > noise + 0.15, (proba.max(1).mean(), held_out, noise)
    assert int((counts >= 8).sum()) >= 9, counts.tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("sigma_max", [50.0, 80.0])
def test_no_nan_over_1000_low_precision_steps_on_ve(precision, sigma_max, device):
    """An EDM-preconditioned network run in bf16/fp16 on VE up to sigma_max: 1000 steps stay finite
    (the state, prior and schedules are fp32; the network sees c_in x, of order 1)."""
    torch.manual_seed(0)
    F = models.build("MLP", dim=2, hidden=32, layers=2, time_embedding="fourier").to(device)

    def denoiser(x, sigma):
        s = sigma[:, None].float()
        c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25).sqrt(), (s**2 + 0.25).rsqrt()
        return c_skip * x + c_out * F(c_in * x, sigma.float())  # the Fourier embedding takes log sigma itself

    sde = VESDE(sigma_min=0.01, sigma_max=sigma_max)
    score_fn = sf.adapters.from_denoiser(denoiser, sde)
    with torch.no_grad():
        x = sf.sample(score_fn, sde, (64, 2), sampler="euler_maruyama", steps=1000, precision=precision, device=device)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_device_state_equals_host_state_bitwise(tmp_path, precision):
    """Step counter, warmup lr and EMA counter as device tensors (the capturable form) give the host
    path's results bit for bit, through a save/load too."""

    def make(device_state):
        model = _mlp()
        opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-2), foreach=False)
        ema = EMA(model, decay=0.99, warmup=3)
        return TrainStep(
            model,
            opt,
            "dsm",
            sde=VPSDE(),
            precision=precision,
            ema=ema,
            warmup=4,
            grad_clip=0.5,
            check_every=0,
            device_state=device_state,
        )

    host, dev = make(False), make(True)
    for n in range(5):
        assert torch.equal(host(_batch(n)), dev(_batch(n)))
    dev.save(tmp_path / "s.safetensors")
    resumed = make(True)
    resumed.load(tmp_path / "s.safetensors")
    for n in range(5, 9):
        a, b, c = host(_batch(n)), dev(_batch(n)), resumed(_batch(n))
        assert torch.equal(a, b) and torch.equal(a, c)
    for p, q, r in zip(_params(host), _params(dev), _params(resumed)):
        assert torch.equal(p, q) and torch.equal(p, r)
    for p, q in zip(host.ema.shadow, dev.ema.shadow):
        assert torch.equal(p, q)
    assert torch.equal(host.optimizer.param_groups[0]["lr"], dev.optimizer.param_groups[0]["lr"])
    assert int(dev._step_t) == dev.step == 9
    model = _mlp()
    with pytest.raises(ValueError, match="tensor learning rates"):
        TrainStep(model, torch.optim.Adam(model.parameters(), lr=1e-2), sde=VPSDE(), warmup=2, device_state=True)


def _capturable_step(device, precision="fp32", **kw):
    torch.manual_seed(0)
    model = models.build("MLP", dim=2, hidden=16, layers=2).to(device)
    flags = {"capturable": True, "fused": precision == "fp16"} if device == "cuda" else {}  # CPU: no capture
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-2, device=device), **flags)
    return TrainStep(
        model,
        opt,
        "dsm",
        sde=VPSDE(),
        ema=EMA(model, decay=0.99, warmup=3),
        warmup=4,
        grad_clip=0.5,
        precision=precision,
        check_every=kw.pop("check_every", 0),
        device_state=True,
        **kw,
    )


def test_train_step_capture_checks_its_requirements_and_is_eager_on_cpu():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="device_state"):
        TrainStep(model, opt, sde=VPSDE(), check_every=0).cuda_graph()
    with pytest.raises(ValueError, match="check_every"):
        TrainStep(model, opt, sde=VPSDE(), device_state=True).cuda_graph()
    with pytest.raises(ValueError, match="skip_nonfinite"):
        TrainStep(model, opt, sde=VPSDE(), device_state=True, skip_nonfinite=True).cuda_graph()
    with pytest.raises(ValueError, match="warmup"):
        TrainStep(model, opt, sde=VPSDE(), device_state=True, check_every=0).cuda_graph(warmup=0)
    eager, graphed = _capturable_step("cpu"), _capturable_step("cpu").cuda_graph()
    for n in range(6):  # CPU: the same steps, eagerly
        assert torch.equal(eager(_batch(n)), graphed(_batch(n)))
    assert graphed.step.step == eager.step == 6


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_captured_train_step_replays_like_eager(precision):
    """DESIGN "Host syncs": with device_state, capturable (fp16: fused) Adam and check_every=0 or K, the
    step is captured once; replay n equals eager step n, through warmup lr, clipping, the scaler and EMA."""
    eager = _capturable_step("cuda", precision, check_every=4)
    graphed = _capturable_step("cuda", precision, check_every=4).cuda_graph(warmup=3)
    for n in range(10):  # 3 eager warm-up steps, the capture (and its first replay), 6 more replays
        x = _batch(n).cuda()
        torch.testing.assert_close(graphed(x), eager(x), rtol=1e-5, atol=1e-6)
    assert graphed.step.step == eager.step == 10 and int(graphed.step._step_t) == 10
    for p, q in zip(graphed.step.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(graphed.step.ema.shadow, eager.ema.shadow):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    graphed.step.check()
    with pytest.raises(ValueError, match="replays batches of"):
        graphed(_batch(0).cuda()[:5])


@pytest.mark.cuda
def test_a_train_step_that_syncs_falls_back_to_eager_with_one_warning():
    def syncing_dsm(score_fn, x, sde, **kw):
        loss = sf.losses.dsm_loss(score_fn, x, sde, return_per_sample=True, **kw)
        if float(loss.sum()) < -1.0:  # a host read: cannot be captured
            raise AssertionError
        return loss

    eager = _capturable_step("cuda", loss=syncing_dsm)
    graphed = _capturable_step("cuda", loss=syncing_dsm).cuda_graph(warmup=1)
    with pytest.warns(RuntimeWarning, match="training step could not be captured") as rec:
        for n in range(4):
            x = _batch(n).cuda()
            torch.testing.assert_close(graphed(x), eager(x), rtol=1e-5, atol=1e-6)
    assert len(rec) == 1 and graphed.step.step == 4


def _log(out):
    """(history, unfinished window, final_loss, loss.png bytes) of a fit() output directory."""
    from scorefast.train.state import read_metadata

    extra = read_metadata(out / "train_state.safetensors", "scorefast_train", 1)["extra"]
    summary = json.loads((out / "summary.json").read_text())
    return extra["history"], extra["window"], summary["final_loss"], (out / "loss.png").read_bytes()


def test_fit_killed_or_interrupted_then_resumed_logs_what_an_uninterrupted_run_logs(tmp_path, monkeypatch):
    """Loss history, loss.png and final_loss equal an uninterrupted run's after a kill -9 (the state
    saved at step 5, mid log window), a Ctrl-C at step 4, and a shorter run continued."""
    kw = dict(data="toy2d", batch=8, log_every=3, save_every=5, sample_grid=False)
    fit(tmp_path / "straight", steps=8, **kw)
    want = _log(tmp_path / "straight")
    assert [h[0] for h in want[0]] == [3, 6] and len(want[1]) == 2 and want[2] == sum(want[1]) / 2

    killed = tmp_path / "killed"  # a real process death: no finally, no last save
    script = (
        "import os, sys\nfrom scorefast.train import TrainStep\nfrom scorefast.train.fit import fit\n"
        "real = TrainStep.__call__\n"
        "def dies(self, x):\n    if self.step == 6:\n        os._exit(9)\n    return real(self, x)\n"
        f"TrainStep.__call__ = dies\nfit(sys.argv[1], steps=8, **{kw!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", script, str(killed)], env=env, capture_output=True, text=True)
    assert res.returncode == 9, res.stderr[-2000:]
    assert fit(killed, steps=8, **kw)["resumed_from"] == 5

    _fit_interrupted_at_call_5(monkeypatch, tmp_path / "ctrl-c", steps=8, **kw)
    assert fit(tmp_path / "ctrl-c", steps=8, **kw)["resumed_from"] == 4
    fit(tmp_path / "longer", steps=4, **kw)
    assert fit(tmp_path / "longer", steps=8, **kw)["resumed_from"] == 4
    for name in ("killed", "ctrl-c", "longer"):
        assert _log(tmp_path / name) == want, name


def test_fit_refuses_a_second_training_into_its_directory(tmp_path):
    from scorefast._io import dir_lock

    kw = dict(data="toy2d", batch=8, save_every=100, sample_grid=False)
    with dir_lock(tmp_path, "out_dir"):  # another training is running there
        with pytest.raises(ValueError, match=rf"out_dir: .* in use by another scorefast process \(pid {os.getpid()}\)"):
            fit(tmp_path, steps=2, **kw)
    assert not (tmp_path / "train_state.safetensors").exists()
    fit(tmp_path, steps=2, **kw)
    with pytest.raises(ValueError, match=r"log_every: .* trained with 50, this run has 10"):
        fit(tmp_path, steps=3, log_every=10, **kw)
    with pytest.raises(ValueError, match=r"lr: .* trained with 0\.002, this run has 0\.001"):
        fit(tmp_path, steps=3, lr=1e-3, **kw)


def test_fit_refuses_a_train_state_of_an_unknown_version(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    fit(tmp_path, data="toy2d", steps=2, batch=8, sample_grid=False)
    path = tmp_path / "train_state.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["scorefast_train"])
    tensors = load_file(str(path))
    for version, match in [(99, "99; .* reads version 1 .*newer scorefast"), ("1", "'1'"), (0, "0;")]:
        save_file(tensors, str(path), metadata={"scorefast_train": json.dumps({**meta, "version": version})})
        with pytest.raises(
            ValueError, match=r"path: .*train_state\.safetensors is a training state of format version " + match
        ):
            fit(tmp_path, data="toy2d", steps=3, batch=8, sample_grid=False)
        model = make_model("toy2d")
        direct = TrainStep(model, torch.optim.Adam(model.parameters()), "dsm", sde=VPSDE())
        with pytest.raises(ValueError, match=r"format version " + match):  # TrainStep.load itself refuses it
            direct.load(path)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"lr": float("nan")}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"ema_decay": 7.0}, "decay"),
        ({"warmup": -1}, "warmup"),
        ({"seed": -1}, "seed"),
        ({"precision": "fp8"}, "precision"),
        ({"data": "cifar"}, "data"),
        ({"device": "bogus"}, "device: not a device"),
        ({"device": "cuda:0"} if not torch.cuda.is_available() else {"device": "cuda:999"}, "device: cuda"),
        ({"log_every": 0}, "log_every"),
    ],
)
def test_fit_checks_every_setting_before_writing(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        fit(tmp_path / "run", **{"data": "toy2d", "steps": 2, "batch": 8, "sample_grid": False, **bad})
    assert not (tmp_path / "run").exists()
