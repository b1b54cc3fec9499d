"""scorefast.compat.diffusers against the real diffusers schedulers, step by step.

Both get the same inputs at every step; diffusers' ``randn_tensor`` is patched to return the
Philox noise our schedulers draw from the same generator (``philox_noise``), so outputs agree to
fp32 rounding.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from scorefast.compat import diffusers as ours  # noqa: E402

MODULES = ("scheduling_sde_ve", "scheduling_euler_discrete", "scheduling_ddim", "scheduling_dpmsolver_multistep")
B, SHAPE = 5, (5, 2, 3, 3)


@pytest.fixture
def philox_randn(monkeypatch):
    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return ours.philox_noise(shape, generator, device or "cpu", dtype or torch.float32)

    for name in MODULES:
        monkeypatch.setattr(getattr(diffusers.schedulers, name), "randn_tensor", randn_tensor)


def model(x, t):
    """A fixed nonlinear 'network' output for (sample, timestep)."""
    return 0.4 * torch.tanh(x) + 1e-3 * float(t) * torch.ones_like(x)


def _close(a, b, scale):
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6 * max(1.0, scale))


def _x(scale=1.0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * scale


def test_score_sde_ve_pred_and_correct(philox_randn):
    real, mine = diffusers.ScoreSdeVeScheduler(), ours.ScoreSdeVeScheduler()
    assert dict(mine.config) == dict(real.config)
    for s in (real, mine):
        s.set_timesteps(20)
        s.set_sigmas(20)
    x = _x(real.config.sigma_max)
    for i, t in enumerate(real.timesteps[:8]):
        sigma = float(real.sigmas[i])
        score = -x / sigma**2
        g1, g2 = torch.Generator().manual_seed(i), torch.Generator().manual_seed(i)
        a, b = real.step_correct(score, x, generator=g1), mine.step_correct(score, x, generator=g2)
        _close(b.prev_sample, a.prev_sample, sigma)
        a, b = real.step_pred(score, t, x, generator=g1), mine.step_pred(score, t, x, generator=g2)
        _close(b.prev_sample, a.prev_sample, sigma)
        _close(b.prev_sample_mean, a.prev_sample_mean, sigma)
        x = a.prev_sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("s_churn", [0.0, 3.0])
def test_euler_discrete(philox_randn, prediction_type, s_churn):
    real = diffusers.EulerDiscreteScheduler(prediction_type=prediction_type)
    mine = ours.EulerDiscreteScheduler.from_config(real.config)
    assert isinstance(mine, diffusers.EulerDiscreteScheduler)
    for s in (real, mine):
        s.set_timesteps(12)
    torch.testing.assert_close(mine.sigmas, real.sigmas, rtol=0, atol=0)
    x = _x(float(real.init_noise_sigma))
    for t in real.timesteps:
        m = model(real.scale_model_input(x, t), t)
        mine.scale_model_input(x, t)
        g1, g2 = torch.Generator().manual_seed(int(t)), torch.Generator().manual_seed(int(t))
        a = real.step(m, t, x, s_churn=s_churn, generator=g1)
        b = mine.step(m, t, x, s_churn=s_churn, generator=g2)
        scale = float(x.abs().max())
        _close(b.prev_sample, a.prev_sample, scale)
        _close(b.pred_original_sample, a.pred_original_sample, scale)
        assert mine.step_index == real.step_index
        x = a.prev_sample


@pytest.mark.parametrize(
    "config",
    [
        {"prediction_type": "epsilon"},
        {"prediction_type": "v_prediction", "clip_sample": False},
        {"prediction_type": "sample", "clip_sample": True},
        {"prediction_type": "epsilon", "thresholding": True, "clip_sample": False},
    ],
    ids=["eps-clip", "v", "sample-clip", "threshold"],
)
@pytest.mark.parametrize("eta,clipped_output", [(0.0, False), (0.7, False), (1.0, True)])
def test_ddim(philox_randn, config, eta, clipped_output):
    real = diffusers.DDIMScheduler(**config)
    mine = ours.DDIMScheduler.from_config(real.config)
    for s in (real, mine):
        s.set_timesteps(10)
    x = _x()
    for t in real.timesteps:
        m = model(x, t)
        g1, g2 = torch.Generator().manual_seed(int(t)), torch.Generator().manual_seed(int(t))
        a = real.step(m, t, x, eta=eta, use_clipped_model_output=clipped_output, generator=g1)
        b = mine.step(m, t, x, eta=eta, use_clipped_model_output=clipped_output, generator=g2)
        _close(b.prev_sample, a.prev_sample, float(x.abs().max()))
        _close(b.pred_original_sample, a.pred_original_sample, float(x.abs().max()))
        x = a.prev_sample


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("solver_type,order", [("midpoint", 2), ("heun", 2), ("midpoint", 3)])
def test_dpm_solver_multistep(philox_randn, algorithm_type, solver_type, order):
    if algorithm_type == "sde-dpmsolver++" and order == 3:
        pytest.skip("diffusers has no third-order SDE solver")
    cfg = dict(algorithm_type=algorithm_type, solver_type=solver_type, solver_order=order)
    if algorithm_type == "dpmsolver":  # diffusers' arithmetic (not fused) must still run through our step
        cfg["final_sigmas_type"] = "sigma_min"
    real = diffusers.DPMSolverMultistepScheduler(**cfg)
    mine = ours.DPMSolverMultistepScheduler.from_config(real.config)
    for s in (real, mine):
        s.set_timesteps(9)
    x = _x()
    for t in real.timesteps:
        m = model(x, t)
        g1, g2 = torch.Generator().manual_seed(int(t)), torch.Generator().manual_seed(int(t))
        a = real.step(m, t, x, generator=g1)
        b = mine.step(m, t, x, generator=g2)
        _close(b.prev_sample, a.prev_sample, float(x.abs().max()))
        x = a.prev_sample


def test_save_and_load_pretrained_keep_our_class(tmp_path):
    mine = ours.EulerDiscreteScheduler(num_train_timesteps=500, prediction_type="v_prediction")
    mine.save_pretrained(tmp_path)
    again = ours.EulerDiscreteScheduler.from_pretrained(tmp_path)
    assert type(again) is ours.EulerDiscreteScheduler
    assert again.config.num_train_timesteps == 500 and again.config.prediction_type == "v_prediction"


def test_noise_is_seeded_by_the_generator_and_batch_invariant():
    s = ours.DDIMScheduler()
    s.set_timesteps(10)
    t = s.timesteps[3]
    x = _x()
    a = s.step(model(x, t), t, x, eta=1.0, generator=torch.Generator().manual_seed(4)).prev_sample
    b = s.step(model(x, t), t, x, eta=1.0, generator=torch.Generator().manual_seed(4)).prev_sample
    c = s.step(model(x[:2], t), t, x[:2], eta=1.0, generator=torch.Generator().manual_seed(4)).prev_sample
    assert torch.equal(a, b) and torch.equal(a[:2], c)
