"""Shipped networks, checkpoints (safetensors + JSON metadata, no pickle) and sf.adapters."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import scorefast as sf
from scorefast import adapters, models
from scorefast.sde import EDM, VESDE, VPSDE, DiscreteVP, SubVPSDE
from tests.test_samplers import linear_score

SDES = [VPSDE(), SubVPSDE(), VESDE(), EDM(), DiscreteVP.linear(N=100)]


@pytest.mark.parametrize(
    "arch,kwargs,shape",
    [
        ("MLP", {"dim": 3, "hidden": 16, "layers": 2}, (5, 3)),
        ("MLP", {"dim": 2, "hidden": 8, "layers": 1, "time_embedding": "fourier"}, (1, 2)),
        ("UNet", {"in_channels": 1, "ch": 8, "ch_mult": (1, 2), "num_res_blocks": 1, "groups": 4}, (3, 1, 8, 8)),
        ("UNet", {"in_channels": 3, "ch": 8, "ch_mult": (1, 2, 2), "num_res_blocks": 1, "groups": 4}, (2, 3, 12, 16)),
    ],
)
def test_networks_map_x_to_its_shape_and_depend_on_time(arch, kwargs, shape):
    torch.manual_seed(0)
    net = models.build(arch, **kwargs)
    for p in net.parameters():  # the UNet's output conv starts at zero; perturb so t matters
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(shape)
    a, b = net(x, torch.full((shape[0],), 10.0)), net(x, torch.full((shape[0],), 500.0))
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert not torch.allclose(a, b)
    # batch elements are independent (no batch statistics in the networks)
    torch.testing.assert_close(net(x[:1], torch.full((1,), 10.0)), a[:1], rtol=1e-5, atol=1e-6)


def test_network_bad_input():
    net = models.build("UNet", in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, groups=4)
    with pytest.raises(ValueError, match="x: expected"):
        net(torch.randn(2, 3, 8, 8), torch.ones(2))
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(2, 1, 7, 8), torch.ones(2))
    with pytest.raises(ValueError, match="arch"):
        models.build("ResNet")
    with pytest.raises(ValueError, match="time_embedding"):
        models.build("MLP", time_embedding="learned")


def test_digits_preset_is_small():
    from scorefast.train.fit import make_model

    assert sum(p.numel() for p in make_model("digits").parameters()) <= 500_000


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_adapters_agree_on_an_exact_gaussian_score(sde):
    """eps, x0, v and denoiser networks built from one exact score give back that score."""
    score = linear_score(sde)
    tmap = sde.time_map
    B = 9
    t = torch.linspace(max(sde.eps, 1e-3), sde.T, B, dtype=torch.float64)
    x = torch.randn(B, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    # the nets receive time_map(t); they evaluate the exact score at the test's own t
    a = lambda tt: sde.mean_coef(tt)[:, None]  # noqa: E731
    s = lambda tt: sde.std(tt)[:, None]  # noqa: E731
    eps_net = lambda y, tn: -s(t) * score(y, t)  # noqa: E731
    x0_net = lambda y, tn: (y + s(t) ** 2 * score(y, t)) / a(t)  # noqa: E731
    want = score(x, t)
    torch.testing.assert_close(adapters.from_eps(eps_net, sde)(x, t), want, rtol=1e-12, atol=1e-12)
    # x0 and D lose digits to the cancellation y - a x0 at small s: rtol ~ 1e-16 |x| / (s^2 |score|)
    torch.testing.assert_close(adapters.from_x0(x0_net, sde)(x, t), want, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(adapters.from_score(lambda y, tn: score(y, t), sde)(x, t), want)

    def denoiser(y, sigma):  # D(y, sigma) with y = x / a: the posterior mean x0
        torch.testing.assert_close(sigma, (sde.std(t) / sde.mean_coef(t)).to(sigma.dtype))
        return x0_net(y * a(t), None)

    torch.testing.assert_close(adapters.from_denoiser(denoiser, sde)(x, t), want, rtol=1e-8, atol=1e-8)
    if isinstance(sde, VPSDE | DiscreteVP) and not isinstance(sde, SubVPSDE):
        v_net = lambda y, tn: a(t) * eps_net(y, tn) - s(t) * x0_net(y, tn)  # noqa: E731
        torch.testing.assert_close(adapters.from_v(v_net, sde)(x, t), want, rtol=1e-10, atol=1e-10)
    else:
        with pytest.raises(ValueError, match="variance-preserving"):
            adapters.from_v(eps_net, sde)
    seen = {}
    adapters.from_eps(lambda y, tn: y + 0 * seen.setdefault("t", tn)[:, None], sde)(x, t)
    torch.testing.assert_close(seen["t"], tmap(t).to(x.dtype))


def test_adapters_run_low_precision_networks_with_fp32_arithmetic():
    sde = VPSDE()
    t = torch.full((4,), 0.3)
    x = torch.randn(4, 2)
    out = adapters.from_eps(lambda y, tn: torch.ones_like(y, dtype=torch.bfloat16), sde)(x, t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, -torch.ones(4, 2) / sde.std(t.double()).float()[:, None])


def test_adapter_bad_input():
    with pytest.raises(TypeError, match="net"):
        adapters.from_eps(3, VPSDE())
    with pytest.raises(TypeError, match="sde"):
        adapters.from_eps(lambda x, t: x, "vp")
    with pytest.raises(ValueError, match="time_map"):
        adapters.from_eps(lambda x, t: x, VPSDE(), time_map="log")
    with pytest.raises(ValueError, match="parameterisation"):
        adapters.from_parameterisation(lambda x, t: x, VPSDE(), "flow")


@pytest.mark.parametrize("parameterisation", ["eps", "score", "x0"])
def test_checkpoint_round_trip(tmp_path, parameterisation):
    torch.manual_seed(0)
    net = models.build("UNet", in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, groups=4)
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    sde = VESDE(sigma_min=0.02, sigma_max=30.0)
    path = models.save(tmp_path / "m.safetensors", net, sde=sde, shape=(1, 8, 8), parameterisation=parameterisation)
    score_fn, sde2, shape = models.load(path)
    assert shape == (1, 8, 8) and isinstance(sde2, VESDE) and sde2.config() == sde.config()
    meta = score_fn.metadata
    for key in ("arch", "arch_kwargs", "sde", "sde_kwargs", "parameterisation", "time_map", "shape", "data_range"):
        assert key in meta
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    want = adapters.from_parameterisation(net.eval(), sde, parameterisation)(x, t)
    torch.testing.assert_close(score_fn(x, t), want, rtol=0, atol=0)
    sample = sf.sample(score_fn, sde2, (2, *shape), sampler="ode_euler", steps=3)
    assert sample.shape == (2, 1, 8, 8)


def test_checkpoint_errors(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="no scorefast metadata"):
        models.load(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        models.load(junk)
    bad = tmp_path / "bad.safetensors"
    meta = {"arch": "os.system", "arch_kwargs": {}, "sde": "VPSDE", "sde_kwargs": {}, "version": 1}
    save_file({"w": torch.zeros(2)}, str(bad), metadata={"scorefast": json.dumps(meta)})
    with pytest.raises(ValueError, match="arch"):
        models.load(bad)
    net = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"sf\.models\.build"):
        models.save(tmp_path / "x.safetensors", net, sde=VPSDE(), shape=(2,))


def test_every_subpackage_is_installed_by_pyproject():
    """A non-editable install ships exactly pyproject's package list: no subpackage may be missing."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(scorefast(?:\.[a-z_]+)*)"', text.split("packages = [", 1)[1].split("]", 1)[0]))
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "scorefast").rglob("__init__.py")} | {
        "scorefast.kernels"
    }
    assert found <= listed, f"missing from pyproject packages: {sorted(found - listed)}"


def test_from_diffusers_with_a_tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()
    for kind in ("epsilon", "v_prediction", "sample"):
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=50, prediction_type=kind)
        score_fn, sde = adapters.from_diffusers(unet, scheduler)
        assert isinstance(sde, DiscreteVP) and sde.N == 50
        x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 0.5, 0.95])
        with torch.no_grad():
            out = unet(x, t.double() * 49).sample.double()
            got = score_fn(x, t).double()
        td = t.double()
        a, s = sde.mean_coef(td)[:, None, None, None], sde.std(td)[:, None, None, None]
        want = {
            "epsilon": -out / s,
            "v_prediction": -(s * x.double() + a * out) / s,
            "sample": (a * out - x.double()) / s**2,
        }[kind]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        x = sf.sample(score_fn, sde, (2, 1, 8, 8), sampler="ddim", steps=4, precision="bf16")
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    with pytest.raises(TypeError, match="scheduler"):
        adapters.from_diffusers(unet, object())


def test_sf_compile_matches_eager_and_refuses_graph_modes():
    torch.manual_seed(0)
    net = models.build("MLP", dim=2, hidden=16, layers=1)
    score_fn = adapters.from_eps(net, VPSDE())
    compiled = sf.compile(score_fn)
    x, t = torch.randn(5, 2), torch.rand(5).double() * 0.9 + 0.05
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), score_fn(x, t), rtol=1e-5, atol=1e-5)
    assert compiled.net is net
    with pytest.raises(ValueError, match="mode"):
        sf.compile(score_fn, mode="reduce-overhead")
    with pytest.raises(TypeError, match="score_fn"):
        sf.compile(None)


def _crafted(tmp_path, meta_changes=None, *, raw=None, tensors=None, drop=()):
    """A small MLP checkpoint whose metadata or tensors were edited."""
    torch.manual_seed(0)
    net = models.build("MLP", dim=2, hidden=16, layers=2)
    path = models.save(tmp_path / "ok.safetensors", net, sde=VPSDE(), shape=(2,))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["scorefast"])
    meta.update(meta_changes or {})
    for key in drop:
        meta.pop(key)
    weights = {**load_file(str(path)), **(tensors or {})}
    weights = {k: v for k, v in weights.items() if v is not None}
    out = tmp_path / "crafted.safetensors"
    save_file(weights, str(out), metadata={"scorefast": raw if raw is not None else json.dumps(meta)})
    return out


def test_declared_architecture_is_checked_against_the_stored_tensors_before_building(tmp_path, monkeypatch):
    """The issue's crafted file (hidden=200000, layers=40: ~160 GB of parameters) is refused from its
    header, before any module is built; so are subtler mismatches, each naming what is wrong."""
    built = []  # modules built with real (not meta) parameters, and tensor data read

    def build(*args, **kwargs):
        model = models.build(*args, **kwargs)
        if any(p.device.type != "meta" for p in model.parameters()):
            built.append(args)
        return model

    monkeypatch.setattr(models.checkpoint, "build", build)
    monkeypatch.setattr(models.checkpoint, "load_file", lambda *a: built.append(a) or load_file(*a))
    cases = [
        ({"arch_kwargs": {"dim": 2, "hidden": 200000, "layers": 40}}, {}, "200000 is not in"),
        ({"arch_kwargs": {"dim": 2, "hidden": 16, "layers": 16}}, {}, "far more parameter tensors than the file's 16"),
        ({}, {"out.1.weight": None}, "tensor 'out.1.weight' is missing"),
        ({}, {"out.1.weight": torch.zeros(3, 16)}, r"'out.1.weight' is stored as \[3, 16\], the architecture needs"),
        ({}, {"out.1.weight": torch.zeros(2, 16, dtype=torch.int32)}, "I32, not a floating-point type"),
        ({}, {"extra": torch.zeros(2)}, "holds tensor 'extra', which a MLP does not have"),
        ({"arch_kwargs": {"dim": 2, "hidden": 16, "layers": 1}}, {}, "holds tensor 'blocks.1.1.bias'"),
    ]
    for meta, tensors, match in cases:
        built.clear()
        with pytest.raises(ValueError, match=match):
            models.load(_crafted(tmp_path, meta, tensors=tensors))
        assert not built  # refused from the header alone: the real module was never built
    assert models.load(_crafted(tmp_path))[2] == (2,) and built


@pytest.mark.parametrize(
    "changes,drop,raw,match",
    [
        ({"arch_kwargs": [16, 2]}, (), None, "'arch_kwargs' must be an object"),
        ({"arch_kwargs": {"width": 3}}, (), None, "arch_kwargs: MLP takes no argument 'width'"),
        ({}, ("arch",), None, "'arch' must be one of MLP, UNet, got None"),
        ({"arch": ["MLP"]}, (), None, "'arch' must be one of"),
        ({"arch_kwargs": {"dim": 2, "hidden": "16"}}, (), None, "arch_kwargs .* do not build a MLP"),
        ({"sde_kwargs": {"beta_min": "a"}}, (), None, "sde_kwargs"),
        ({"sde_kwargs": {"N": 10**10}}, (), None, r"sde_kwargs: N .* \[1, 1000000\]"),  # a 80 GB table
        ({"sde": None}, (), None, "'sde' must be one of"),
        ({"shape": "2"}, (), None, "'shape' must be a list"),
        ({"shape": [3]}, (), None, r"shape \[3\] does not fit the MLP"),
        ({"data_range": [1, -1]}, (), None, "'data_range'"),
        ({"parameterisation": 3}, (), None, "'parameterisation' must be one of"),
        ({"version": "1"}, (), None, "'version' must be an int"),
        ({"version": 99}, (), None, "checkpoint format 99 is newer"),
        ({}, (), '{"a": ' * 50_000 + "1" + "}" * 50_000, "nested too deeply"),
        ({"extra": [[[[[[[[[1]]]]]]]]]}, (), None, "nested deeper than 8 levels"),
        ({}, (), "[1, 2]", "must be a JSON object, got list"),
        ({}, (), "{oops", "is not JSON"),
        ({}, (), " " * (9 << 20), "characters"),
    ],
    ids=lambda v: None if isinstance(v, str) and len(v) < 40 else "",
)
def test_malformed_checkpoint_metadata_is_a_clear_error(tmp_path, changes, drop, raw, match):
    with pytest.raises(ValueError, match=r"path: .*crafted\.safetensors.*" + match):
        models.load(_crafted(tmp_path, changes, raw=raw, drop=drop))
