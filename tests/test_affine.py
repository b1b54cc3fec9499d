"""Adapters' affine form (score = a x + b out) and its folding into the samplers' fused updates.

Folding changes roundings, not arithmetic: the fused update used to read fp32(-eps / s) (the
adapter's division in fp32) times fp32(c); it now reads eps times fp32(c * (-1 / s)) computed in
float64 (and for x0 / v, the x coefficient c_x + c * a in float64).  So the results are not bitwise
those of the formed score; both are fp32 roundings of the same float64 run, and the folded one's
error against that run is held to flash-attention's rule (at most 2x the formed one's); a 10% error
in a folded coefficient fails it (``test_a_planted_fold_error_is_caught``).
"""

from __future__ import annotations

import pytest
import torch

import scorefast as sf
from bench import _glue
from scorefast import graphs
from scorefast.samplers import base
from scorefast.sde import EDM, VPSDE, RectifiedFlow

W = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3


def net(x, t):
    """A small fixed network: the same function in every dtype (float64 weights cast to x's)."""
    return torch.tanh(x @ W.to(x.dtype)) + 0.1 * t.to(x.dtype)[:, None]


MAKERS = ["from_score", "from_eps", "from_x0", "from_v", "from_velocity"]


def _adapter(maker, sde):
    return sf.adapters.from_denoiser(net, sde) if maker == "from_denoiser" else getattr(sf.adapters, maker)(net, sde)


@pytest.mark.parametrize("maker", [*MAKERS, "from_denoiser"])
@pytest.mark.parametrize("sde", [VPSDE(), EDM()], ids=["VPSDE", "EDM"])
def test_affine_form_is_the_score(maker, sde):
    if maker == "from_v" and isinstance(sde, EDM):
        pytest.skip("v-prediction needs a variance-preserving SDE")
    fn = _adapter(maker, sde)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, 5, dtype=torch.float64)
    out, a, b = fn.affine(x, t)
    assert a.shape == b.shape == (5,) and a.dtype == b.dtype == torch.float64
    torch.testing.assert_close(a[:, None] * x + b[:, None] * out, fn(x, t), rtol=1e-12, atol=1e-12)
    if hasattr(fn, "affine_coefs"):
        a2, b2 = fn.affine_coefs(t)
        torch.testing.assert_close(torch.as_tensor(a2).expand(5), a, rtol=0, atol=0)
        torch.testing.assert_close(torch.as_tensor(b2).expand(5), b, rtol=0, atol=0)


def test_a_plain_callable_is_a_zero_b_one():
    """A plain callable has no affine form: the samplers use its output as the score (a = 0, b = 1),
    and the results are those of from_score around it to the bit (b = 1 folds exactly)."""
    sde = VPSDE()
    plain = sf.sample(net, sde, (6, 3), sampler="euler_maruyama", steps=12, seed=1)
    folded = sf.sample(
        sf.adapters.from_score(net, sde, time_map="t"), sde, (6, 3), sampler="euler_maruyama", steps=12, seed=1
    )
    assert torch.equal(plain, folded)


SAMPLERS = [
    ("euler_maruyama", {}),
    ("reverse_diffusion", {}),
    ("ancestral", {}),
    ("ddim", {"eta": 0.5}),
    ("ode_euler", {}),
    ("heun", {}),
    ("dpm_solver++", {"variant": "3m"}),
    ("dpm_solver++", {"variant": "2m-sde"}),
    ("pc", {"norm": "expected"}),
    ("pc", {"norm": "sample"}),
    ("rk45", {}),  # the stage times' affine coefficients, once per attempt
    ("adaptive_sde", {"rtol": 0.05, "atol": 0.05}),  # the attempt's two times' coefficients, in its table
]


@pytest.mark.parametrize("maker", ["from_eps", "from_x0", "from_v"])
@pytest.mark.parametrize("name,options", SAMPLERS, ids=[f"{n}-{o}" for n, o in SAMPLERS])
def test_folded_sampling_equals_the_formed_score_within_fp32_rounding(name, options, maker):
    sde = VPSDE()
    fn = _adapter(maker, sde)

    def formed(x, t):  # the same score, formed by the adapter (no affine form to fold)
        return fn(x, t)

    kw = dict(sampler=name, steps=12, seed=1, **options)
    got = sf.sample(fn, sde, (6, 3), **kw)
    want = sf.sample(formed, sde, (6, 3), **kw)
    _within_fp32_rounding(got, want, sf.sample(fn, sde, (6, 3), dtype=torch.float64, **kw))
    with graphs.emulated():  # the captured step folds the same way: equal to the bit
        assert torch.equal(sf.sample(fn, sde, (6, 3), cuda_graph=True, **kw), got)


def _within_fp32_rounding(got, want, ref):
    """flash-attention's rule: the folded run's error against the float64 run (the adapter's own
    arithmetic in float64) at most twice the formed fp32 run's, plus 1e-6 of the samples' scale."""
    scale = ref.abs().max().item()
    err = (got.double() - ref).abs().max().item()
    err_formed = (want.double() - ref).abs().max().item()
    assert err <= 2 * err_formed + 1e-6 * scale, (err, err_formed, scale)


def test_rectified_flow_velocity_is_folded():
    sde = RectifiedFlow()
    fn = sf.adapters.from_velocity(net, sde)
    for name in ("ode_euler", "heun", "dpm_solver++", "euler_maruyama"):
        got = sf.sample(fn, sde, (6, 3), sampler=name, steps=10, seed=2)
        want = sf.sample(lambda x, t: fn(x, t), sde, (6, 3), sampler=name, steps=10, seed=2)
        ref = sf.sample(fn, sde, (6, 3), sampler=name, steps=10, seed=2, dtype=torch.float64)
        _within_fp32_rounding(got, want, ref)


def test_a_planted_fold_error_is_caught(monkeypatch):
    """The tolerance above is sharp: b 10% off at one step fails it."""
    sde = VPSDE()
    fn = sf.adapters.from_eps(net, sde)
    real = base._affine_coefs

    def planted(f, times):
        a, b, uses_x = real(f, times)
        b = b.clone()
        b[5] *= 1.1
        return a, b, uses_x

    kw = dict(sampler="ddim", steps=12, seed=1)
    want = sf.sample(lambda x, t: fn(x, t), sde, (6, 3), **kw)
    ref = sf.sample(fn, sde, (6, 3), dtype=torch.float64, **kw)
    monkeypatch.setattr(base, "_affine_coefs", planted)
    got = sf.sample(fn, sde, (6, 3), **kw)
    with pytest.raises(AssertionError):
        _within_fp32_rounding(got, want, ref)


@pytest.mark.parametrize("maker", ["from_x0", "from_v"])
def test_a_planted_fold_error_in_adaptive_sde_is_caught(maker, monkeypatch):
    """adaptive_sde folds through ``sde_coefs``'s fa, fb: b' 1% off fails the rule above."""
    from scorefast.samplers import adaptive_sde

    sde = VPSDE()
    fn = _adapter(maker, sde)
    kw = dict(sampler="adaptive_sde", steps=12, seed=1, rtol=0.05, atol=0.05)
    want = sf.sample(lambda x, t: fn(x, t), sde, (6, 3), **kw)
    ref = sf.sample(fn, sde, (6, 3), dtype=torch.float64, **kw)
    _within_fp32_rounding(sf.sample(fn, sde, (6, 3), **kw), want, ref)  # the real fold passes
    real = adaptive_sde.sde_coefs

    def planted(h, times, a, b, fa=None, fb=None, **options):
        return real(h, times, a, b, fa, None if fb is None else fb * 1.01, **options)

    monkeypatch.setattr(adaptive_sde, "sde_coefs", planted)
    with pytest.raises(AssertionError):
        _within_fp32_rounding(sf.sample(fn, sde, (6, 3), **kw), want, ref)


def test_adaptive_sde_refuses_affine_coefs_of_the_wrong_shape():
    sde = VPSDE()
    fn = sf.adapters.from_eps(net, sde)
    fn.affine_coefs = lambda t: (torch.zeros(t.shape[-1], dtype=torch.float64), -1 / sde.std(t[0]))
    with pytest.raises(ValueError, match="affine_coefs"):
        sf.sample(fn, sde, (6, 3), sampler="adaptive_sde", seed=1)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_output_is_read_by_the_fused_kernel_uncast(precision):
    """A half-precision network output goes to the fused update as it is (not cast): the
    step's glue ops are the same as in fp32 (no cast pass), and the result is the fp32 arithmetic
    on that output (equal to forming the score from the same half-precision output in float64)."""
    sde = VPSDE()
    fn = sf.adapters.from_x0(_glue.net, sde)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def half_net(x, t):
        return _glue.net(x.to(half), t.to(half))

    fn_half = sf.adapters.from_x0(half_net, sde)
    ops = _glue.captured_ops("ddim", {}, sde, score_fn=fn_half)
    assert len(ops) == len(_glue.captured_ops("ddim", {}, sde, score_fn=fn)) + 2  # the net's own 2 input casts
    seen = []
    real = base.fused_update_table

    def spy(x, terms, *args, **kw):
        seen.extend(t.dtype for t in terms)
        return real(x, terms, *args, **kw)

    base.fused_update_table, saved = spy, real
    try:
        sf.sample(fn_half, sde, (4, 3), sampler="ddim", steps=5, seed=0)
    finally:
        base.fused_update_table = saved
    assert half in seen


def test_edm_denoiser_is_folded_and_a_vp_denoiser_keeps_its_own_path():
    """from_denoiser on EDM (a = 1: the network input x / a is x) folds like the other adapters,
    within fp32 rounding of the float64 run; on VP its input x / a(t) is a pass of its own and the
    adapter forms the score, to the bit as a plain callable would."""
    edm = EDM()

    def denoiser(x, sigma):
        return torch.tanh(x @ W.to(x.dtype)) / (1 + sigma.to(x.dtype)[:, None] ** 2)

    fn = sf.adapters.from_denoiser(denoiser, edm)
    for name in ("heun", "dpm_solver++", "euler_maruyama"):
        kw = dict(sampler=name, steps=8, seed=0)
        got = sf.sample(fn, edm, (4, 3), **kw)
        want = sf.sample(lambda x, t: fn(x, t), edm, (4, 3), **kw)
        _within_fp32_rounding(got, want, sf.sample(fn, edm, (4, 3), dtype=torch.float64, **kw))
    assert len(_glue.captured_ops("heun", {}, edm, score_fn=sf.adapters.from_denoiser(_glue.net, edm))) <= 3
    vp = VPSDE()
    fn = sf.adapters.from_denoiser(denoiser, vp)
    a = sf.sample(fn, vp, (4, 3), sampler="heun", steps=6, seed=0)
    b = sf.sample(lambda x, t: fn(x, t), vp, (4, 3), sampler="heun", steps=6, seed=0)
    assert torch.equal(a, b)


def test_a_wrapper_that_copied_the_adapters_attributes_is_called_as_it_is():
    """functools.wraps copies __dict__: a guidance-like wrapper then carries the adapter's affine
    attributes, and folding them would skip the wrapper.  It must be sampled through its own call."""
    import functools

    sde = VPSDE()
    fn = sf.adapters.from_eps(net, sde)

    @functools.wraps(fn)
    def doubled(x, t):
        return 2 * fn(x, t)

    a = sf.sample(doubled, sde, (4, 3), sampler="ddim", steps=6, seed=0)
    b = sf.sample(lambda x, t: 2 * fn(x, t), sde, (4, 3), sampler="ddim", steps=6, seed=0)
    assert torch.equal(a, b)
