"""The DSM's one-call C++ kernels on the cpu backend (``csrc/cpu/train_impl.h``): the VP / sub-VP
perturbation (``losses._fused_vp_perturb``) against the torch formula path it replaces (the SDE's own
ops, the same kernels for the draws), against float64 closed forms, across batches and through its
custom op (what a trace or the capture stand-in records); and the eps network's residual and
gradient in one pass (``losses.dsm_eps_residual``) against the two kernels it replaces."""

from __future__ import annotations

import math

import pytest
import torch

import scorefast as sf
from scorefast import losses
from scorefast.sde import VESDE, VPSDE, SubVPSDE

pytestmark = pytest.mark.skipif(
    not sf.backends.state("cpu").available or losses._vp_perturb_kernel() is None, reason="cpu kernel not built"
)

SDES = [
    pytest.param(VPSDE(), id="vp"),
    pytest.param(SubVPSDE(), id="subvp"),
    pytest.param(VPSDE(beta_min=0.05, beta_max=13.7), id="vp-own-betas"),
]


def _formula_path(x, sde, **kw):
    """``_perturb`` without the C++ call: the SDE's torch ops (what every other backend runs)."""
    t = losses._times(sde, x.shape[0], **kw)
    return (t, *losses._perturb_at(x, t, sde, **{k: v for k, v in kw.items() if k != "eps"}))


def _kw(B: int, step=7, first: int = 0):
    ids = torch.arange(first, first + B, dtype=torch.int64)
    return dict(eps=1e-5, seed=11, step=step, sample_ids=ids, backend="cpu")


@pytest.mark.parametrize("sde", SDES)
@pytest.mark.parametrize("shape", [(1000, 3), (77, 2, 5, 3), (9, 1)])
def test_the_one_call_is_the_formula_paths_numbers(sde, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    kw = _kw(shape[0])
    t, std, x_t = losses._fused_vp_perturb(x, sde, **kw)
    t_ref, std_ref, x_t_ref = _formula_path(x, sde, **kw)
    assert t.dtype == torch.float64 and std.dtype == torch.float32 and x_t.shape == x.shape
    assert torch.equal(t, t_ref)  # the draws and their affine map: the same ops' roundings
    # libm's exp/expm1 for Sleef's: the float32 coefficients agree but where a float64 last bit
    # decides a tie (none in these draws); allow one such sample in a thousand, one ulp apart
    same = (std == std_ref) & (x_t == x_t_ref).flatten(1).all(1)
    assert int((~same).sum()) <= shape[0] // 1000
    torch.testing.assert_close(std, std_ref, rtol=2**-23, atol=0)
    torch.testing.assert_close(x_t, x_t_ref, rtol=2**-22, atol=1e-7)


@pytest.mark.parametrize("sde", SDES)
def test_the_coefficients_are_the_closed_forms_rounded_once(sde):
    """mean and std against float64 closed forms of the schedule at the kernel's t: within one
    float32 rounding (half an ulp) plus libm's float64 error."""
    B = 4001
    x = torch.zeros(B, 1)
    t, std, x_t = losses._fused_vp_perturb(x, sde, **_kw(B))
    assert (t >= 1e-5).all() and (t < 1).all()
    ld = -0.25 * t**2 * (sde.beta_1 - sde.beta_0) - 0.5 * t * sde.beta_0
    var = -torch.expm1(2 * ld)
    want_std = var if isinstance(sde, SubVPSDE) else var.sqrt()
    torch.testing.assert_close(std.double(), want_std, rtol=2**-24 * 1.01, atol=0)
    # x = 0: x_t is std z exactly, z the stream-2 normals
    z = sf.rng.randn((B, 1), seed=11, step=7, stream=sf.rng.STREAM_DSM, sample_ids=torch.arange(B))
    assert torch.equal(x_t, std[:, None] * z)


def test_a_wrong_formula_fails_the_closed_form_check():
    """The closed-form test is sharp: a kernel with beta_0 off by 1% would fail it."""
    sde, wrong = VPSDE(), VPSDE(beta_min=0.101)
    t, std, _ = losses._fused_vp_perturb(torch.zeros(500, 1), wrong, **_kw(500))
    ld = -0.25 * t**2 * (sde.beta_1 - sde.beta_0) - 0.5 * t * sde.beta_0
    with pytest.raises(AssertionError):
        torch.testing.assert_close(std.double(), (-torch.expm1(2 * ld)).sqrt(), rtol=2**-24 * 1.01, atol=0)


def test_each_sample_is_its_own_whatever_the_batch():
    sde = VPSDE()
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(2))
    t, std, x_t = losses._fused_vp_perturb(x, sde, **_kw(300))
    for lo, hi in ((0, 1), (123, 130), (299, 300)):
        ts, ss, xs = losses._fused_vp_perturb(x[lo:hi].contiguous(), sde, **_kw(hi - lo, first=lo))
        assert torch.equal(ts, t[lo:hi]) and torch.equal(ss, std[lo:hi]) and torch.equal(xs, x_t[lo:hi])


def test_the_op_is_the_eager_call_bit_for_bit_and_passes_opcheck():
    sde = SubVPSDE()
    x = torch.randn(37, 6, generator=torch.Generator().manual_seed(3))
    ids = torch.arange(37, dtype=torch.int64)
    args = (True, sde.beta_0, sde.beta_1 - sde.beta_0, 1e-5, 1 - 1e-5)
    t, coefs, x_t = losses.dsm_perturb_vp_op(x, ids, torch.tensor(11), torch.tensor(5), *args)
    te, se, xe = losses._fused_vp_perturb(x, sde, **_kw(37, step=5))
    assert torch.equal(t, te) and torch.equal(coefs[1], se) and torch.equal(x_t, xe)
    torch.library.opcheck(losses.dsm_perturb_vp_op, (x, ids, torch.tensor(11), torch.tensor(5), *args))


@pytest.mark.parametrize(
    "case",
    [
        pytest.param((VESDE(), torch.float32, "cpu", True), id="another-sde"),
        pytest.param((VPSDE(), torch.float64, "cpu", True), id="float64"),
        pytest.param((VPSDE(), torch.float32, "torch", True), id="torch-backend"),
        pytest.param((VPSDE(), torch.float32, "cpu", False), id="not-contiguous"),
        pytest.param((type("MyVP", (VPSDE,), {})(), torch.float32, "cpu", True), id="a-subclass"),
    ],
)
def test_what_it_leaves_to_the_formula_path(case):
    sde, dtype, backend, contiguous = case
    x = torch.randn(8, 6, dtype=dtype)
    x = x if contiguous else x[:, ::2]
    assert losses._fused_vp_perturb(x, sde, **(_kw(8) | {"backend": backend})) is None


def test_dsm_loss_takes_the_one_call_and_keeps_its_values(monkeypatch):
    """dsm_loss on the cpu backend with and without the C++ call: the same losses (the coefficients
    are the same floats here) and gradients."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 3))
    score = sf.adapters.from_eps(lambda x, t: net(x), VPSDE())
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(4))
    calls = []
    real = losses._fused_vp_perturb
    monkeypatch.setattr(losses, "_fused_vp_perturb", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = losses.dsm_loss(score, x, VPSDE(), seed=3, step=2)
    g_fused = torch.autograd.grad(fused, list(net.parameters()))
    assert calls
    monkeypatch.setattr(losses, "_fused_vp_perturb", lambda *a, **k: None)
    plain = losses.dsm_loss(score, x, VPSDE(), seed=3, step=2)
    g_plain = torch.autograd.grad(plain, list(net.parameters()))
    assert torch.equal(fused, plain) and all(torch.equal(a, b) for a, b in zip(g_fused, g_plain))


def test_a_batch_that_needs_its_gradient_takes_the_differentiable_path():
    """The op has no autograd formula: dsm_loss of an x that requires grad keeps the torch path, whose
    x_t = mean x + std z carries d loss / d x (before, the op's path raised in backward)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 3))
    score = sf.adapters.from_eps(lambda x, t: net(x), VPSDE())
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(5))
    xg = x.clone().requires_grad_(True)
    assert losses._fused_vp_perturb(xg, VPSDE(), **_kw(16)) is None
    (gx,) = torch.autograd.grad(losses.dsm_loss(score, xg, VPSDE(), seed=3, step=2), xg)
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0
    with torch.no_grad():  # no graph wanted: the one call again
        assert losses._fused_vp_perturb(xg, VPSDE(), **_kw(16)) is not None


def _isa_modules():
    """The cpu backend's ISA builds this CPU can run (a higher one dies with SIGILL on import)."""
    from scorefast.backends.cpu_backend import runnable_isas

    return [pytest.param(isa, id=isa) for isa in ("default", "avx2", "avx512") if isa in runnable_isas()]


def _counted(monkeypatch, name: str) -> list:
    """Calls of the loaded cpu module's ``name`` (the C++ kernel), recorded and passed through."""
    module = sf.backends.get("cpu").load()
    real, calls = getattr(module, name), []
    monkeypatch.setattr(module, name, lambda *a: calls.append(a) or real(*a))
    return calls


@pytest.mark.parametrize("isa", _isa_modules())
@pytest.mark.parametrize("shape", [(1000, 3), (5, 4097), (37, 2, 3, 5), (7, 15), (7, 16), (9, 17), (3, 65),
                                   (4, 1023), (4, 1025), (1, 1), (0, 5)], ids=str)  # fmt: skip
@pytest.mark.parametrize("coef", [-2 / 64, -0.37])
def test_the_one_pass_residual_is_the_two_kernels_bit_for_bit(isa, shape, coef):
    """Each ISA build's one C++ pass (r never stored) against that build's two kernels it replaces (r =
    z - out by fused_update with coefficients (-1, 1), its sums by sumsq_norms) and torch's r * coef:
    tiles, vector tails, short packed rows, views and an empty batch, at 1 and 2 threads."""
    import importlib

    m = importlib.import_module(f"scorefast._C_{isa}")
    out = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    B = shape[0]
    o2 = out.reshape(B, math.prod(shape[1:]))
    ids = torch.arange(7, 7 + B, dtype=torch.int64)
    r = torch.empty_like(o2)
    m.fused_update(r, o2, [], torch.tensor([[-1.0], [1.0]]), ids, 3, 9, sf.rng.STREAM_DSM, True)
    want_sq = torch.empty(2, B)
    m.sumsq_norms(want_sq, r, ids, o2.shape[1], 0, 0, 0, False)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            g, sq = torch.empty_like(o2), torch.empty(B)
            m.eps_dsm_residual(g, sq, o2, ids, 3, 9, sf.rng.STREAM_DSM, coef)
            assert torch.equal(sq, want_sq[0]) and torch.equal(g, r.mul(coef)), threads
    finally:
        torch.set_num_threads(before)
    if B:  # against the exact residual, and each sample's values are its own whatever the batch
        z = sf.rng.randn(tuple(o2.shape), seed=3, step=9, stream=sf.rng.STREAM_DSM, sample_ids=ids)
        torch.testing.assert_close(g.double(), (z.double() - o2.double()) * coef, rtol=2**-23, atol=2**-23)
    if B > 3:
        gp, part = torch.empty(2, o2.shape[1]), torch.empty(2)
        m.eps_dsm_residual(gp, part, o2[2:4].contiguous(), ids[2:4].clone(), 3, 9, sf.rng.STREAM_DSM, coef)
        assert torch.equal(part, sq[2:4]) and torch.equal(gp, g[2:4])


def test_dsm_eps_residual_takes_the_kernel_where_it_applies(monkeypatch):
    """``losses.dsm_eps_residual`` calls the C++ pass for fp32 rows and a host coefficient (its values
    the fallback's), and the two kernels otherwise (a tensor coefficient, bf16 rows, a recording)."""
    calls = _counted(monkeypatch, "eps_dsm_residual")
    out = torch.randn(6, 2, 5, generator=torch.Generator().manual_seed(2))
    ids = torch.arange(6, dtype=torch.int64)
    sq, g = losses.dsm_eps_residual(out, -0.25, 3, 9, ids, "cpu")
    assert len(calls) == 1
    r = losses._noise_plus(out, -1.0, 3, 9, ids, "cpu")
    assert torch.equal(sq, losses._rows_sumsq(r, ids, "cpu")) and torch.equal(g, r.mul(-0.25))
    sq_t, g_t = losses.dsm_eps_residual(out, torch.tensor(-0.25), 3, 9, ids, "cpu")
    losses.dsm_eps_residual(out.bfloat16(), -0.25, 3, 9, ids, "cpu")
    assert len(calls) == 1 and torch.equal(sq_t, sq) and torch.equal(g_t, g)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_train_step_takes_the_one_pass_residual_in_fp32(monkeypatch, precision):
    """fp32 steps call the C++ pass once per micro-batch; bf16 (its output is bf16) and fp16 (the
    GradScaler's coefficient is a tensor) keep the two kernels."""
    calls = _counted(monkeypatch, "eps_dsm_residual")
    net = sf.models.build("MLP", dim=2, hidden=16, layers=1)
    step = sf.train.TrainStep(net, torch.optim.SGD(net.parameters(), lr=1e-3), "dsm", sde=VPSDE(), accumulate=3,
                              precision=precision)  # fmt: skip
    step(torch.randn(12, 2))
    assert len(calls) == (3 if precision == "fp32" else 0)
