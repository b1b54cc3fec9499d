"""GPU end-to-end at a fixed NFE budget (``scorefast bench --suite gpu-e2e-mlp`` / ``gpu-e2e-unet``).

For pc, euler_maruyama, heun and dpm_solver++ on (a) a 2-D MLP score network (launch-bound) and (b) a
small NCSN-style UNet at 32x32 (compute-bound), batch 1, 64, 1024 (the UNet: 1, 64, 256), the same
run times:

- ``peer``: the faithful eager copy of score_sde's / k-diffusion's loop (``bench/baselines``), fp32;
- ``eager`` / ``graph``: ``sf.sample`` without / with ``cuda_graph=True``, in fp32 and bf16;
- ``compile``: ``sf.sample`` on ``sf.compile(score)`` (torch.compile), fp32, at two batch sizes.

Rows carry samples/s, time per NFE and the loop's host CPU time per step (``info["cpu_time_s"]``
over the steps, from a separate short run), and whether the graph was really replayed.
``SCOREFAST_BENCH_DEVICE=cpu`` runs the same grid on CPU (graphs are then a no-op): a smoke test.
"""

from __future__ import annotations

import os

import pytest
import torch

import scorefast as sf
from bench.baselines import k_diffusion, score_sde
from bench.conftest import QUICK

DEVICE = os.environ.get("SCOREFAST_BENCH_DEVICE", "cuda")
MODEL = os.environ.get("SCOREFAST_BENCH_SUITE", "gpu-e2e-mlp").rsplit("-", 1)[-1]  # mlp or unet
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")

BATCHES = {"mlp": [1, 8] if QUICK else [1, 64, 1024], "unet": [1, 4] if QUICK else [1, 64, 256]}[MODEL]
COMPILE_BATCHES = set() if QUICK else {64, BATCHES[-1]}
BUDGET = 48 if QUICK else 100  # pc runs VPSDE(N=BUDGET // 2): N > beta_max
SAMPLERS = ["pc", "euler_maruyama", "heun", "dpm_solver++"]
ROLES = ["peer", "eager", "graph", "eager-bf16", "graph-bf16", "compile"]


_nets: dict = {}


def _net(compiled: bool):
    """One network for every SDE and sampler (so torch.compile compiles once per batch shape)."""
    if compiled not in _nets:
        if False not in _nets:
            torch.manual_seed(0)
            if MODEL == "mlp":
                net = torch.nn.Sequential(
                    torch.nn.Linear(3, 128), torch.nn.SiLU(), torch.nn.Linear(128, 128), torch.nn.SiLU(),
                    torch.nn.Linear(128, 2),
                )  # fmt: skip
            else:
                net = sf.models.UNet(in_channels=3, ch=32 if QUICK else 64, ch_mult=(1, 2, 2), num_res_blocks=1)
            _nets[False] = net.to(DEVICE).eval()
        _nets[True] = sf.compile(_nets[False])
    return _nets[compiled]


def _score(sde_name: str, compiled: bool):
    """(sde, score_fn, sample shape): the MLP scaled like ``_samplers.MLPScore``, the UNet through from_eps."""
    sde = sf.sde.EDM() if sde_name == "edm" else sf.sde.VPSDE(N=BUDGET // 2 if sde_name == "vp-pc" else BUDGET)
    net = _net(compiled)
    if MODEL == "unet":
        return sde, sf.adapters.from_eps(net, sde), (3, 32, 32)

    def score(x, t):  # (0.1 net(x / sqrt(v), t) - x) / v, v = a^2 + s^2: finite on every SDE's time range
        t64 = t.double()
        v = (sde.mean_coef(t64) ** 2 + sde.std(t64) ** 2).to(x.dtype)[:, None]
        return (0.1 * net(torch.cat([x / v.sqrt(), t.to(x.dtype)[:, None]], dim=1)) - x) / v

    return sde, score, (2,)


def _case(sampler: str, role: str, B: int):
    """(name, fn -> samples, nfe, steps, peer, sample kwargs or None)."""
    sde_name = {"pc": "vp-pc", "euler_maruyama": "vp", "heun": "edm", "dpm_solver++": "edm"}[sampler]
    sde, score, shape = _score(sde_name, role == "compile")
    full = (B, *shape)
    steps = {"pc": BUDGET // 2, "euler_maruyama": BUDGET, "heun": (BUDGET + 1) // 2, "dpm_solver++": BUDGET}[sampler]
    nfe = 2 * steps - 1 if sampler == "heun" else (BUDGET if sampler != "pc" else 2 * steps)
    if role == "peer":
        if sampler in ("pc", "euler_maruyama"):
            options = {} if sampler == "pc" else {"n_steps": 0, "predictor": "euler_maruyama"}
            return f"score_sde {sampler}", lambda: score_sde.pc_sampler(score, sde, full, device=DEVICE, **options), nfe
        sigmas = [*sf.sde.karras_sigmas(steps, sde.sigma_min, sde.sigma_max).tolist(), 0.0]
        x_T = sde.prior_sampling(full, seed=0, device=DEVICE)

        def denoiser(x, sigma):  # k-diffusion's D(x; sigma) from the score: x + sigma^2 s
            return x + sigma.reshape(-1, *([1] * (x.dim() - 1))) ** 2 * score(x, sigma)

        loop = k_diffusion.sample_heun if sampler == "heun" else k_diffusion.sample_dpmpp_2m
        return f"k-diffusion {loop.__name__}", lambda: loop(denoiser, x_T, sigmas), nfe
    kwargs = dict(sampler=sampler, steps=steps, device=DEVICE, cuda_graph=role.startswith("graph"))
    kwargs["precision"] = "bf16" if role.endswith("bf16") else "fp32"
    if sampler == "pc":
        kwargs["norm"] = "sample" if MODEL == "unet" else "batch"
    name = f"sf.sample({sampler}, {role})"
    return name, lambda: sf.sample(score, sde, full, **kwargs), nfe, kwargs, (score, sde, full)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_e2e(record, sampler, B, role):
    if role == "compile" and B not in COMPILE_BATCHES:
        pytest.skip("torch.compile runs at two batch sizes (compile time)")
    case = _case(sampler, role, B)
    name, fn, nfe = case[:3]
    extra = {}
    if len(case) > 3:  # ours: host CPU time per step, and whether the graph replayed
        kwargs, (score, sde, full) = case[3], case[4]
        short = dict(kwargs, steps=min(kwargs["steps"], 50))
        with torch.no_grad():
            sf.sample(score, sde, full, **short)  # warm
            _, info = sf.sample(score, sde, full, return_info=True, **short)
        extra = {"cpu_s_per_step": info["cpu_time_s"] / short["steps"], "graphed": info["graphed"]}

    def timed():
        with torch.no_grad():
            fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    record(
        timed,
        name=name,
        backend="torch" if role == "peer" else "default",
        dtype=torch.bfloat16 if role.endswith("bf16") else torch.float32,
        size=B,
        group=f"{sampler}-{MODEL}-B{B}",
        role=role,
        rounds=3 if MODEL == "unet" and B > 64 else 5,
        nfe=nfe,
        model=MODEL,
        peer="score_sde" if sampler in ("pc", "euler_maruyama") else "k-diffusion",
        **extra,
    )
