"""scorefast.compat.diffusers against the real diffusers 0.42 schedulers, step by step.

Three copies of each scheduler take the same inputs at every step: diffusers' own in float32,
ours in float32, and diffusers' own in float64 (its tables made float64 with the same values, its
float32 casts kept float64: ``peers.KeepFloat64``), the reference.  Flash-attention's rule: at every
step and for every output, our error against the reference is at most twice diffusers' own float32
error, plus a floor of two float32 ulps of the output's size (for exact zeros).  The trajectory
follows the reference.  Stochastic steps see the same noise: diffusers' ``randn_tensor`` is patched
to return ``philox_noise``, the Philox draw ours makes inside the kernel from the same generator.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from scorefast.compat import diffusers as ours  # noqa: E402
from tests.peers import KeepFloat64, patch_diffusers_randn, tables_to_float64  # noqa: E402

SHAPE = (2, 3, 4, 4)
EPS32 = torch.finfo(torch.float32).eps
STOCK = {cls.__name__: cls.__mro__[1] for cls in ours.SCHEDULERS}
_BUILT: dict = {}


@pytest.fixture(autouse=True)
def same_noise(monkeypatch):
    patch_diffusers_randn(monkeypatch, STOCK.values(), ours.philox_noise)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def model(x, t):
    """A fixed nonlinear 'network' output for (model input, timestep)."""
    return 0.5 * torch.tanh(x) + 2e-4 * float(t) * torch.ones_like(x) - 0.1


def _fields(out):
    return {
        f.name: getattr(out, f.name) for f in dataclasses.fields(out) if isinstance(getattr(out, f.name), torch.Tensor)
    }


def _schedulers(name, config, steps, set_kw):
    key = (name, repr(sorted(config.items())))
    if key not in _BUILT:  # some constructors take a second (KDPM2's): build each config once
        _BUILT[key] = STOCK[name](**config)
    real, mine, ref = (copy.deepcopy(_BUILT[key]) for _ in range(3))
    mine.__class__ = getattr(ours, name)  # from_config / from_pretrained are tested on their own
    for s in (real, mine, ref):
        s.set_timesteps(steps, **set_kw)
    torch.testing.assert_close(mine.timesteps, real.timesteps, rtol=0, atol=0)
    if hasattr(real, "sigmas"):
        torch.testing.assert_close(mine.sigmas, real.sigmas, rtol=0, atol=0)
    tables_to_float64(ref)
    return real, mine, ref


def _finite(out) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in out.values())


def parity(
    name, config=None, steps=8, step_kw=None, set_kw=None, x_scale=None, seed=0, prepare=None, limit=None, net=None
):
    """Run the three copies along the reference trajectory; return the number of steps compared.

    Where diffusers' own float64 step is not finite (its NaN edges), its float32 step must not be
    either, and ours must return finite values (checked by ``limit(x, m, ours_out)`` when given) or
    raise ValueError for a coefficient that is not finite; the run stops there.  ``limit(copies, x, m, out)``
    gets (real, mine, ref) after the step.
    """
    real, mine, ref = _schedulers(name, config or {}, steps, set_kw or {})
    if prepare is not None:
        prepare(real, mine, ref)
    takes_generator = "generator" in inspect.signature(STOCK[name].step).parameters
    scale = float(real.init_noise_sigma) if x_scale is None else x_scale
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * scale
    for i, t in enumerate(real.timesteps):
        xin = x
        if hasattr(real, "scale_model_input"):  # the flow-matching schedulers have none
            xin = real.scale_model_input(x, t)
            mine.scale_model_input(x, t)
            ref.scale_model_input(x.double(), t)
        m = (net or model)(xin, t)

        def run(s, xx, mm, i=i, t=t):
            kw = dict(step_kw or {})
            if takes_generator:
                kw["generator"] = torch.Generator().manual_seed(1000 + i)
            with KeepFloat64() if s is ref else torch.no_grad():
                return _fields(s.step(mm, t, xx, **kw))

        r, a = run(ref, x.double(), m.double()), run(real, x, m)
        if not _finite(r):  # diffusers' NaN edge
            assert not _finite(a), (name, i, "diffusers float32 is finite where its float64 is not")
            try:
                b = run(mine, x, m)
            except ValueError as e:
                assert "not finite" in str(e)
                return i
            assert _finite(b), (name, i)
            if limit is not None:
                limit((real, mine, ref), x, m, b)
            return i
        b = run(mine, x, m)
        assert a.keys() == b.keys()
        for key in a:
            assert b[key].dtype == a[key].dtype, (i, key)
            size = float(r[key].abs().max())
            err_ours = float((b[key].double() - r[key]).abs().max())
            err_real = float((a[key].double() - r[key]).abs().max())
            assert err_ours <= 2 * err_real + 2 * EPS32 * size, (name, i, key, err_ours, err_real, size)
        x = r["prev_sample"].float()
    return len(real.timesteps)


# -- the grid -------------------------------------------------------------------------------------
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SIGMAS = ({}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True})
SIGMA_IDS = ("default", "karras", "exponential", "beta")
THRESHOLD = {"thresholding": True, "sample_max_value": 0.8, "dynamic_thresholding_ratio": 0.9}


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize(
    "extra,step_kw",
    [
        ({}, {}),
        ({"clip_sample": True, "clip_sample_range": 0.7}, {"eta": 0.6}),
        ({**THRESHOLD, "clip_sample": False}, {"eta": 1.0, "use_clipped_model_output": True}),
        ({"clip_sample": False, "timestep_spacing": "trailing", "set_alpha_to_one": False}, {"eta": 0.3}),
    ],
    ids=["plain", "clip-eta", "threshold-clipped-output", "trailing"],
)
def test_ddim(prediction_type, extra, step_kw):
    parity("DDIMScheduler", {"prediction_type": prediction_type, **extra}, step_kw=step_kw)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
@pytest.mark.parametrize("extra", [{}, {"clip_sample": False}, {**THRESHOLD}], ids=["clip", "plain", "threshold"])
def test_ddpm(prediction_type, variance_type, extra):
    parity("DDPMScheduler", {"prediction_type": prediction_type, "variance_type": variance_type, **extra}, steps=10)


def _with_variance(x, t):
    """A model output of twice the sample's channels: the prediction, then a learned variance in (0, 0.1)
    (a variance for "learned", an interpolation weight for "learned_range")."""
    return torch.cat([model(x, t), 0.05 * (1 + torch.tanh(0.3 * x))], dim=1)


def test_ddpm_last_train_steps():
    """Custom timesteps 3, 2, 1, 0: beta_t = 1 - abar_t/abar_(t-1) ~ 1e-4 loses half its digits in diffusers' float32
    (diffusers' own test_full_loop_with_noise pins that rounding); ours takes it in float64 from the same table."""
    parity("DDPMScheduler", {}, steps=None, set_kw={"timesteps": [3, 2, 1, 0]})


@pytest.mark.parametrize("variance_type", ["learned", "learned_range", "fixed_large_log"])
def test_ddpm_learned_variance(variance_type):
    """learned / learned_range take the variance from the model's extra channels (a per-element noise scale);
    fixed_large_log is diffusers' NaN (the square root of a log variance): ours raises ValueError instead."""
    net = _with_variance if variance_type.startswith("learned") else None
    compared = parity("DDPMScheduler", {"variance_type": variance_type, "clip_sample": False}, steps=6, net=net)
    assert compared == (0 if variance_type == "fixed_large_log" else 6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("skip_prk_steps", [False, True])
def test_pndm(prediction_type, skip_prk_steps):
    parity("PNDMScheduler", {"prediction_type": prediction_type, "skip_prk_steps": skip_prk_steps}, steps=10)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("extra", [{}, {"clip_sample": True}, {**THRESHOLD}], ids=["plain", "clip", "threshold"])
def test_lcm(prediction_type, extra):
    parity("LCMScheduler", {"prediction_type": prediction_type, **extra}, steps=4)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("sigmas", SIGMAS, ids=SIGMA_IDS)
def test_lms(prediction_type, sigmas):
    parity("LMSDiscreteScheduler", {"prediction_type": prediction_type, **sigmas}, steps=8)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("sigmas", SIGMAS, ids=SIGMA_IDS)
@pytest.mark.parametrize("step_kw", [{}, {"s_churn": 3.0, "s_tmin": 0.5, "s_tmax": 20.0}], ids=["plain", "churn"])
def test_euler(prediction_type, sigmas, step_kw):
    parity("EulerDiscreteScheduler", {"prediction_type": prediction_type, **sigmas}, step_kw=step_kw)


def test_euler_final_sigma_min_and_trailing():
    parity("EulerDiscreteScheduler", {"final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"})
    parity("EulerDiscreteScheduler", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"})


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("extra", [{}, {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True}])
def test_euler_ancestral(prediction_type, extra):
    parity("EulerAncestralDiscreteScheduler", {"prediction_type": prediction_type, **extra})


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("sigmas", SIGMAS, ids=SIGMA_IDS)
def test_heun(prediction_type, sigmas):
    parity("HeunDiscreteScheduler", {"prediction_type": prediction_type, **sigmas}, steps=6)


def test_heun_clip():
    parity("HeunDiscreteScheduler", {"prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.5})


@pytest.mark.parametrize("name", ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"])
@pytest.mark.parametrize(
    "prediction_type,sigmas", list(zip(["epsilon", "v_prediction"] * 2, SIGMAS)), ids=list(SIGMA_IDS)
)  # KDPM2's constructor takes a second: each sigma kind once, prediction types alternating
def test_kdpm2(name, prediction_type, sigmas):
    parity(name, {"prediction_type": prediction_type, **sigmas}, steps=6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("schedule,final", [("karras", "zero"), ("exponential", "zero"), ("karras", "sigma_min")])
@pytest.mark.parametrize("step_kw", [{}, {"s_churn": 2.0}], ids=["plain", "churn"])
def test_edm_euler(prediction_type, schedule, final, step_kw):
    cfg = {"prediction_type": prediction_type, "sigma_schedule": schedule, "final_sigmas_type": final}
    parity("EDMEulerScheduler", cfg, step_kw=step_kw)


@pytest.mark.parametrize(
    "config,set_kw",
    [
        ({}, {}),
        ({"shift": 3.0}, {}),
        ({"use_dynamic_shifting": True}, {"mu": 0.8}),
        ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, {"mu": 1.3}),
        ({"shift": 2.0, "shift_terminal": 0.1}, {}),
        ({"use_karras_sigmas": True}, {}),
        ({"invert_sigmas": True}, {}),
        ({"stochastic_sampling": True, "shift": 2.0}, {}),
    ],
    ids=["plain", "shift", "dynamic-mu", "dynamic-linear", "terminal", "karras", "invert", "stochastic"],
)
def test_flow_match_euler(config, set_kw):
    parity("FlowMatchEulerDiscreteScheduler", config, set_kw=set_kw, x_scale=1.0)


@pytest.mark.parametrize("config,step_kw", [({}, {}), ({"shift": 3.0}, {}), ({"shift": 2.0}, {"s_churn": 1.0})])
def test_flow_match_heun(config, step_kw):
    parity("FlowMatchHeunDiscreteScheduler", config, steps=6, step_kw=step_kw, x_scale=1.0)


def test_score_sde_ve_pred_and_correct():
    real, mine, ref = _schedulers("ScoreSdeVeScheduler", {}, 20, {})
    for s in (real, mine, ref):
        s.set_sigmas(20)
    tables_to_float64(ref)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * real.config.sigma_max
    for i, t in enumerate(real.timesteps[:8]):
        sigma = float(real.sigmas[i])
        score = -x / sigma**2 + 0.1 * torch.tanh(x)
        for method, args in (("step_correct", (score, x)), ("step_pred", (score, t, x))):
            outs = []
            for s in (real, mine, ref):
                a = [
                    v.double() if s is ref and isinstance(v, torch.Tensor) and v.is_floating_point() else v
                    for v in args
                ]
                with KeepFloat64() if s is ref else torch.no_grad():
                    outs.append(_fields(getattr(s, method)(*a, generator=torch.Generator().manual_seed(i))))
            a, b, r = outs
            for key in a:
                assert b[key].dtype == a[key].dtype
                err_ours, err_real = ((o[key].double() - r[key]).abs().max() for o in (b, a))
                assert err_ours <= 2 * err_real + 2 * EPS32 * r[key].abs().max(), (method, i, key)
        x = r["prev_sample"].float()


# -- DPM-Solver, DEIS, UniPC: algorithms x solver types x orders, then options one at a time ----------
DPM_ALGORITHMS = [
    (alg, st, order)
    for alg in ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
    for st in ("midpoint", "heun")
    for order in (1, 2, 3)
    if not (alg == "sde-dpmsolver" and order == 3)
]
DPM_OPTIONS = [
    {"prediction_type": "v_prediction"},
    {"prediction_type": "sample"},
    {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0},
    {"use_karras_sigmas": True},
    {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True},
    {"use_lu_lambdas": True},
    {**THRESHOLD},
    {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True, "prediction_type": "v_prediction"},
    {"lower_order_final": False},
    {"euler_at_final": True},
    {"variance_type": "learned_range"},
    {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
]


def _dpm_config(alg, solver_type, order, **extra):
    cfg = {"algorithm_type": alg, "solver_type": solver_type, "solver_order": order, **extra}
    if alg in ("dpmsolver", "sde-dpmsolver"):
        cfg.setdefault("final_sigmas_type", "sigma_min")
    return cfg


@pytest.mark.parametrize("alg,solver_type,order", DPM_ALGORITHMS)
def test_dpm_multistep_algorithms(alg, solver_type, order):
    parity("DPMSolverMultistepScheduler", _dpm_config(alg, solver_type, order), steps=7)


@pytest.mark.parametrize("alg", ["dpmsolver++", "sde-dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("options", DPM_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())[:40])
def test_dpm_multistep_options(alg, options):
    if alg == "dpmsolver" and options.get("prediction_type") == "flow_prediction":
        pytest.skip("diffusers' dpmsolver has no flow prediction")
    parity(
        "DPMSolverMultistepScheduler",
        _dpm_config(alg, "heun" if "lu" in str(options) else "midpoint", 3, **options),
        steps=7,
    )


@pytest.mark.parametrize("alg,solver_type,order", [a for a in DPM_ALGORITHMS if a[0] != "sde-dpmsolver"])
def test_dpm_singlestep_algorithms(alg, solver_type, order):
    parity("DPMSolverSinglestepScheduler", _dpm_config(alg, solver_type, order), steps=8)


@pytest.mark.parametrize("alg", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize(
    "options",
    [o for o in DPM_OPTIONS if "use_lu_lambdas" not in o and "euler_at_final" not in o and "timestep_spacing" not in o],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())[:40],
)
def test_dpm_singlestep_options(alg, options):
    parity("DPMSolverSinglestepScheduler", _dpm_config(alg, "heun", 3, **options), steps=7)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"prediction_type": "v_prediction"},
        {"prediction_type": "sample", **THRESHOLD},
        {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 2.0},
        {"use_karras_sigmas": True},
        {"use_exponential_sigmas": True, "lower_order_final": False},
        {"use_beta_sigmas": True},
    ],
    ids=["eps", "v", "sample-threshold", "flow", "karras", "exponential", "beta"],
)
def test_deis(order, options):
    parity("DEISMultistepScheduler", {"solver_order": order, **options}, steps=7)


@pytest.mark.parametrize("predict_x0", [True, False])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_algorithms(predict_x0, solver_type, order):
    parity(
        "UniPCMultistepScheduler",
        {"predict_x0": predict_x0, "solver_type": solver_type, "solver_order": order},
        steps=7,
    )


@pytest.mark.parametrize(
    "options",
    [
        {"prediction_type": "v_prediction"},
        {"prediction_type": "sample", **THRESHOLD},
        {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0},
        {"use_karras_sigmas": True},
        {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
        {"use_exponential_sigmas": True},
        {"use_beta_sigmas": True},
        {"disable_corrector": [0, 2]},
        {"lower_order_final": False, "solver_order": 2},
        {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())[:40],
)
def test_unipc_options(options):
    parity("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh2", **options}, steps=7)


def _shared_noise_sampler(real, mine, ref):
    """The same noise for all three copies (diffusers' float64 copy would grow its own Brownian tree in float64,
    with other draws): the k-th call of each copy's noise sampler returns the k-th fixed normal field."""

    def sampler(dtype):
        calls = []

        def noise(sigma, sigma_next):
            calls.append((float(sigma), float(sigma_next)))
            gen = torch.Generator().manual_seed(len(calls) + 7)
            return torch.randn(SHAPE, generator=gen).to(dtype)

        return noise

    real.noise_sampler, mine.noise_sampler, ref.noise_sampler = (
        sampler(torch.float32),
        sampler(torch.float32),
        sampler(torch.float64),
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sigmas", SIGMAS, ids=SIGMA_IDS)
def test_dpm_sde(prediction_type, sigmas):
    parity(
        "DPMSolverSDEScheduler", {"prediction_type": prediction_type, **sigmas}, steps=5, prepare=_shared_noise_sampler
    )


def test_dpm_sde_keeps_diffusers_brownian_noise():
    """With its own Brownian tree (same noise_sampler_seed) ours gives diffusers' samples."""
    real = diffusers.DPMSolverSDEScheduler(noise_sampler_seed=3, use_karras_sigmas=True)
    mine = copy.deepcopy(real)
    mine.__class__ = ours.DPMSolverSDEScheduler
    for s in (real, mine):
        s.set_timesteps(5)
    x = y = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * float(real.init_noise_sigma)
    for t in real.timesteps:
        x = real.step(model(real.scale_model_input(x, t), t), t, x).prev_sample
        y = mine.step(model(mine.scale_model_input(y, t), t), t, y).prev_sample
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))


# -- edges: equal consecutive sigmas (h = 0) --------------------------------------------------------
def _returns_the_sample(copies, x, m, out):
    """The h = 0 limit: the sample itself; for UniPC, the sample as its corrector left it (``last_sample``,
    held to the same rule against diffusers' float64 corrector, which is finite there)."""
    real, mine, ref = copies
    if isinstance(mine, ours.UniPCMultistepScheduler):
        err_ours, err_real = ((s.last_sample.double() - ref.last_sample).abs().max() for s in (mine, real))
        assert err_ours <= 2 * err_real + 2 * EPS32 * ref.last_sample.abs().max()
        x = mine.last_sample
    torch.testing.assert_close(out["prev_sample"], x, rtol=0, atol=2 * EPS32 * float(x.abs().max()))


H0_CASES = [
    ("DPMSolverMultistepScheduler", {"algorithm_type": alg, "solver_type": st, "solver_order": order, kind: True})
    for kind, algs in (("use_karras_sigmas", ("dpmsolver++", "sde-dpmsolver++")), ("use_lu_lambdas", ("dpmsolver++",)))
    for alg in algs
    for st, order in (("midpoint", 2), ("heun", 2), ("midpoint", 3))
] + [
    ("DEISMultistepScheduler", {"use_karras_sigmas": True, "solver_order": 3}),
    ("UniPCMultistepScheduler", {"use_karras_sigmas": True, "solver_order": 2, "solver_type": "bh1"}),
    ("UniPCMultistepScheduler", {"use_karras_sigmas": True, "solver_order": 3, "predict_x0": False}),
]


@pytest.mark.parametrize(
    "name,config", H0_CASES, ids=lambda c: c if isinstance(c, str) else "-".join(map(str, c.values()))
)
def test_equal_final_sigmas_return_the_sample(name, config):
    """karras / lu sigmas with final_sigmas_type="sigma_min" repeat the last sigma, so the last step has h = 0
    (16 steps: no lower-order final step).  diffusers' midpoint update returns the sample, its heun and
    third-order ones NaN; ours return the sample, and never divide by zero (issue 18, item 4)."""
    config = {"prediction_type": "v_prediction", "final_sigmas_type": "sigma_min", "lower_order_final": False, **config}
    if name == "DEISMultistepScheduler":
        config.pop("final_sigmas_type")  # DEIS always repeats its last karras sigma
    real, *_ = _schedulers(name, config, 16, {})
    assert float(real.sigmas[-1]) == float(real.sigmas[-2])
    compared = parity(name, config, steps=16, limit=_returns_the_sample)
    assert compared in (15, 16)  # every step compared, or all but the last where diffusers gives NaN


# -- output dtypes (issue 18, item 5) ---------------------------------------------------------------
DTYPE_CASES = (
    [(cls.__name__, {}) for cls in ours.SCHEDULERS if cls.__name__ != "ScoreSdeVeScheduler"]
    + [
        (name, {"prediction_type": "sample"})
        for name in (
            "DDIMScheduler",
            "DDPMScheduler",
            "LMSDiscreteScheduler",
            "EulerDiscreteScheduler",
            "HeunDiscreteScheduler",
            "DPMSolverMultistepScheduler",
            "DPMSolverSinglestepScheduler",
            "DEISMultistepScheduler",
            "UniPCMultistepScheduler",
            "LCMScheduler",
        )
    ]
    + [
        ("DDIMScheduler", {**THRESHOLD}),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", **THRESHOLD}),
        ("DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
        ("UniPCMultistepScheduler", {"predict_x0": False}),
        ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}),
    ]
)
DTYPES = [(torch.float16,) * 2, (torch.bfloat16,) * 2, (torch.float32, torch.float16), (torch.float16, torch.float32)]
DTYPES += [(torch.float64,) * 2]


@pytest.mark.parametrize(
    "name,config", DTYPE_CASES, ids=lambda c: c if isinstance(c, str) else "-".join(map(str, c.values()))
)
def test_output_dtypes_match_diffusers(name, config):
    """For half and mixed inputs every output has diffusers' dtype, and our error against diffusers' float64 run
    of the same (rounded) inputs is at most twice diffusers' own, plus two ulps of the output dtype."""
    steps = 10 if name == "PNDMScheduler" else 3
    for sample_dtype, model_dtype in DTYPES:
        real, mine, ref = _schedulers(name, config, steps, {})
        if name == "DPMSolverSDEScheduler":
            _shared_noise_sampler(real, mine, ref)
        takes_generator = "generator" in inspect.signature(STOCK[name].step).parameters
        scale = float(getattr(real, "init_noise_sigma", 1.0))
        x = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * scale).to(sample_dtype)
        for i, t in enumerate(real.timesteps):
            m = model(x.float(), t).to(model_dtype)
            outs = []
            for s, xx, mm in ((real, x, m), (mine, x, m), (ref, x.double(), m.double())):
                kw = {"generator": torch.Generator().manual_seed(i)} if takes_generator else {}
                with KeepFloat64() if s is ref else torch.no_grad():
                    outs.append(_fields(s.step(mm, t, xx, **kw)))
            a, b, r = outs
            for key in a:
                assert b[key].dtype == a[key].dtype, (sample_dtype, model_dtype, i, key)
                if not bool(torch.isfinite(r[key]).all()):  # diffusers' NaN edge (UniPC eps to sigma 0)
                    continue
                if a[key].dtype == torch.float64:  # float64 in and out (Philox normals made in float64 by ours)
                    torch.testing.assert_close(b[key], r[key], rtol=1e-5, atol=1e-6 * float(r[key].abs().max()))
                    continue
                err_ours, err_real = (float((o[key].double() - r[key]).abs().max()) for o in (b, a))
                floor = 2 * torch.finfo(a[key].dtype).eps * float(r[key].abs().max())
                assert err_ours <= 2 * err_real + floor, (sample_dtype, model_dtype, i, key, err_ours, err_real)
            x = a["prev_sample"]


def test_score_sde_ve_output_dtypes():
    for sample_dtype, model_dtype in DTYPES:
        real, mine, _ = _schedulers("ScoreSdeVeScheduler", {}, 5, {})
        for s in (real, mine):
            s.set_sigmas(5)
        x = torch.randn(SHAPE).to(sample_dtype) * 10
        m = (-x.float() / 100).to(model_dtype)
        for method, args in (("step_correct", (m, x)), ("step_pred", (m, real.timesteps[1], x))):
            a = _fields(getattr(real, method)(*args, generator=torch.Generator().manual_seed(0)))
            b = _fields(getattr(mine, method)(*args, generator=torch.Generator().manual_seed(0)))
            assert {k: v.dtype for k, v in b.items()} == {k: v.dtype for k, v in a.items()}, (method, sample_dtype)
