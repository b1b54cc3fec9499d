"""scorefast.compat.diffusers schedulers inside diffusers pipelines, with a tiny UNet2DModel made offline.

- ``save_pretrained`` -> ``DiffusionPipeline.from_pretrained`` gives our scheduler back (issue 18, item 6);
- a whole pipeline call with each swapped scheduler equals the stock one for deterministic settings and,
  given the same noise, for stochastic ones; with their own noise, ours and the stock ones inject noise of
  the same law;
- a list of B generators: image b's noise depends on generator b alone.
"""

from __future__ import annotations

import inspect
import json
import math
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import DDPMPipeline, DiffusionPipeline, UNet2DModel  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from scorefast.compat import diffusers as ours  # noqa: E402
from tests.peers import patch_diffusers_randn  # noqa: E402

STOCK = {cls.__name__: cls.__mro__[1] for cls in ours.SCHEDULERS}
STEPPED = [cls.__name__ for cls in ours.SCHEDULERS if cls.__name__ != "ScoreSdeVeScheduler"]


@pytest.fixture(autouse=True)
def quiet():
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


class LoopPipeline(DiffusionPipeline):
    """The generic sampling loop of diffusers' pipelines (init_noise_sigma, scale_model_input, step)."""

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, batch_size=1, generator=None, num_inference_steps=5, **step_kw):
        image = randn_tensor((batch_size, 3, 8, 8), generator=generator)
        self.scheduler.set_timesteps(num_inference_steps)
        image = image * getattr(self.scheduler, "init_noise_sigma", 1.0)
        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        for t in self.scheduler.timesteps:
            x = self.scheduler.scale_model_input(image, t) if hasattr(self.scheduler, "scale_model_input") else image
            out = self.unet(x, t).sample
            kw = {"generator": generator} if takes_generator else {}
            image = self.scheduler.step(out, t, image, **kw, **step_kw).prev_sample
        return image


def _config(name: str) -> dict:
    """A non-default config (so that a lost config shows), fast to build (KDPM2 builds 1000-step tables)."""
    stock = STOCK[name]
    keys = inspect.signature(stock.__init__).parameters
    cfg = {"num_train_timesteps": 200} if "num_train_timesteps" in keys else {}
    if "prediction_type" in keys and name not in ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"):
        cfg["prediction_type"] = "v_prediction"
    return cfg


@pytest.mark.parametrize("name", [cls.__name__ for cls in ours.SCHEDULERS])
def test_pipeline_saved_with_our_scheduler_loads_back_with_it(tmp_path, unet, name):
    mine = getattr(ours, name)(**_config(name))
    DDPMPipeline(unet=unet, scheduler=mine).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["scorefast.compat.diffusers", name]
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is type(mine)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(mine.config)
    # and a stock pipeline takes ours as a component in place of its own
    DDPMPipeline(unet=unet, scheduler=STOCK[name](**_config(name))).save_pretrained(tmp_path / "stock")
    swapped = DiffusionPipeline.from_pretrained(tmp_path / "stock", scheduler=mine)
    assert swapped.scheduler is mine


DETERMINISTIC = [
    ("DDIMScheduler", {}),
    ("PNDMScheduler", {"skip_prk_steps": True}),
    ("LMSDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", {}),
    ("HeunDiscreteScheduler", {}),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverSinglestepScheduler", {}),
    ("KDPM2DiscreteScheduler", {}),
    ("DEISMultistepScheduler", {}),
    ("UniPCMultistepScheduler", {}),
    ("EDMEulerScheduler", {}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
    ("FlowMatchHeunDiscreteScheduler", {}),
]
STOCHASTIC = [
    ("DDIMScheduler", {}, {"eta": 1.0}),
    ("DDPMScheduler", {}, {}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("KDPM2AncestralDiscreteScheduler", {}, {}),
    ("EulerDiscreteScheduler", {}, {"s_churn": 2.0}),
    ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, {}),
    ("LCMScheduler", {}, {}),
]


def _pipelines(unet, name, config):
    stock = STOCK[name](**config)
    return LoopPipeline(unet, stock), LoopPipeline(unet, getattr(ours, name).from_config(stock.config))


@pytest.mark.parametrize("name,config", DETERMINISTIC, ids=[n for n, _ in DETERMINISTIC])
def test_deterministic_pipeline_equals_stock(unet, name, config):
    stock, mine = _pipelines(unet, name, config)
    a = stock(batch_size=2, generator=torch.Generator().manual_seed(0))
    b = mine(batch_size=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


@pytest.mark.parametrize("name,config,step_kw", STOCHASTIC, ids=[n for n, *_ in STOCHASTIC])
def test_stochastic_pipeline_equals_stock_given_the_same_noise(monkeypatch, unet, name, config, step_kw):
    patch_diffusers_randn(monkeypatch, [STOCK[name]], ours.philox_noise)
    stock, mine = _pipelines(unet, name, config)
    gens = [[torch.Generator().manual_seed(s) for s in (3, 4)] for _ in range(2)]
    a = stock(batch_size=2, generator=gens[0], **step_kw)
    b = mine(batch_size=2, generator=gens[1], **step_kw)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


@pytest.mark.parametrize("name,config,step_kw", STOCHASTIC, ids=[n for n, *_ in STOCHASTIC])
def test_injected_noise_has_the_stock_law(name, config, step_kw):
    """Each stochastic step is affine in its noise: two generators on the same inputs differ by s (z1 - z2).
    With their own noise (torch's for the stock scheduler, Philox for ours), that difference must be centred
    Gaussian with the same variance (a 10% error in s fails: the variance ratio is held to 4%)."""
    n = 64
    shape = (n, 3, 16, 16)
    stock = STOCK[name](**config)
    mine = getattr(ours, name).from_config(stock.config)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    diffs = {}
    for label, s in (("stock", stock), ("ours", mine)):
        s.set_timesteps(6)
        t = s.timesteps[2]
        ds = []
        for g1, g2 in ((1, 2), (3, 4)):
            outs = []
            for g in (g1, g2):
                s._step_index = None
                if hasattr(s, "_begin_index"):
                    s._begin_index = None
                if name == "KDPM2AncestralDiscreteScheduler":  # its noise comes in the second stage
                    s.step(0.1 * x, t, x, generator=torch.Generator().manual_seed(99))
                outs.append(s.step(0.1 * torch.tanh(x), t, x, generator=torch.Generator().manual_seed(g), **step_kw))
            ds.append((outs[0].prev_sample - outs[1].prev_sample).flatten().double())
        diffs[label] = torch.cat(ds)
    var_stock, var_ours = float(diffs["stock"].var()), float(diffs["ours"].var())
    assert var_stock > 0
    assert abs(var_ours / var_stock - 1) < 0.04, (var_ours, var_stock)
    z = diffs["ours"] / math.sqrt(var_stock)
    assert abs(float(z.mean())) < 4 / math.sqrt(z.numel())
    from scipy import stats

    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3


def _noisy_step(mine, name, x, m, generator, step_kw):
    """One stochastic step of ``mine`` at its third timestep (KDPM2-ancestral: its noisy second stage)."""
    mine.set_timesteps(6)
    t = mine.timesteps[2]
    mine._step_index = None
    if name == "KDPM2AncestralDiscreteScheduler":
        mine.step(m, t, x)
    return mine.step(m, t, x, generator=generator, **step_kw).prev_sample


@pytest.mark.parametrize("name,config,step_kw", STOCHASTIC, ids=[n for n, *_ in STOCHASTIC])
def test_list_of_generators_one_key_per_image(name, config, step_kw):
    """Image b's noise depends on generator b alone: batch [g5, g6, g7] gives image 1 of batch [g6], bitwise."""
    mine = getattr(ours, name)(**config)
    x = torch.randn((3, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    m = 0.1 * torch.tanh(x)

    def step(rows, seeds):
        return _noisy_step(mine, name, x[rows], m[rows], [torch.Generator().manual_seed(s) for s in seeds], step_kw)

    batch = step(slice(0, 3), (5, 6, 7))
    alone = step(slice(1, 2), (6,))
    assert torch.equal(batch[1:2], alone)
    moved = step(slice(0, 3), (6, 6, 6))  # the same generator seed in every slot: the same noise
    assert torch.equal(moved[1:2], alone)
    assert not torch.equal(batch[0], batch[2])
    with pytest.raises(ValueError, match="generator"):
        step(slice(0, 3), (5, 6))


def test_pipeline_with_a_list_of_generators_is_reproducible_per_image(unet):
    """Through a whole DDPM pipeline call: image b of a batch made with [g_0, ..., g_{B-1}] is the image a batch
    of one makes with g_b (within the UNet's batch-size rounding)."""
    pipe = LoopPipeline(unet, ours.DDPMScheduler())
    batch = pipe(batch_size=3, generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    alone = pipe(batch_size=1, generator=[torch.Generator().manual_seed(6)])
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-5)
    assert (batch[0] - batch[2]).abs().max() > 0.1


@pytest.mark.parametrize("name,config,step_kw", STOCHASTIC, ids=[n for n, *_ in STOCHASTIC])
def test_one_generator_seeds_the_noise_and_batch_size_does_not(name, config, step_kw):
    """One generator: its seed decides the noise (torch.manual_seed without one); sample b's noise is the same
    in a batch of 3 and of 2 (Philox ids arange(B)), bitwise."""
    mine = getattr(ours, name)(**config)
    x = torch.randn((3, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    m = 0.1 * torch.tanh(x)

    def step(rows, generator):
        return _noisy_step(mine, name, x[:rows], m[:rows], generator, step_kw)

    a = step(3, torch.Generator().manual_seed(11))
    assert torch.equal(step(3, torch.Generator().manual_seed(11)), a)
    assert torch.equal(step(2, torch.Generator().manual_seed(11)), a[:2])
    assert not torch.equal(step(3, torch.Generator().manual_seed(12)), a)
    torch.manual_seed(5)
    b = step(3, None)
    torch.manual_seed(5)
    assert torch.equal(step(3, None), b) and not torch.equal(b, a)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_ddpm_pipeline_call_with_ours_equals_stock(monkeypatch, tmp_path, unet, name):
    """diffusers' own DDPMPipeline, saved with our scheduler and loaded back, gives the stock pipeline's images."""
    patch_diffusers_randn(monkeypatch, [STOCK[name]], ours.philox_noise)
    DDPMPipeline(unet=unet, scheduler=getattr(ours, name)()).save_pretrained(tmp_path)
    mine = DiffusionPipeline.from_pretrained(tmp_path)
    stock = DDPMPipeline(unet=unet, scheduler=STOCK[name]())
    kw = {"batch_size": 2, "num_inference_steps": 6, "output_type": "np"}
    a = stock(generator=torch.Generator().manual_seed(1), **kw).images
    b = mine(generator=torch.Generator().manual_seed(1), **kw).images
    assert type(mine.scheduler) is getattr(ours, name)
    assert abs(b - a).max() < 1e-5


def test_ddim_pipeline_takes_ours_by_assignment(monkeypatch, tmp_path, unet):
    """DDIMPipeline's constructor converts any scheduler to diffusers' DDIMScheduler (so a saved DDIMPipeline loads
    back with the stock class); assigned after construction, ours runs the pipeline and gives its images."""
    patch_diffusers_randn(monkeypatch, [STOCK["DDIMScheduler"]], ours.philox_noise)
    stock = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    mine = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    mine.scheduler = ours.DDIMScheduler.from_config(mine.scheduler.config)
    for eta in (0.0, 1.0):
        kw = {"batch_size": 2, "num_inference_steps": 6, "output_type": "np", "eta": eta}
        a = stock(generator=torch.Generator().manual_seed(1), **kw).images
        b = mine(generator=torch.Generator().manual_seed(1), **kw).images
        assert abs(b - a).max() < 1e-5
    mine.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"][0] == "scorefast.compat.diffusers"
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is diffusers.DDIMScheduler  # DDIMPipeline.__init__'s conversion, not ours to change
