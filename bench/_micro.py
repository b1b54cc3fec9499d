"""Micro-benchmark cases shared by the CPU and GPU suites: each fused op against eager PyTorch,
torch.compile of the same eager code, and a kernel moving the same bytes."""

from __future__ import annotations

from functools import cache

import torch

import scorefast as sf


@cache
def cases(
    kind: str,
    size: tuple,
    device_type: str,
    backend: str,
    compile_sizes: frozenset = frozenset(),
    with_compile: bool = True,
) -> dict:
    """{role: (name, fn, bytes)} of one group, built once per run so every role times the same inputs.

    ``compile_sizes``: the fused-update sizes that get a torch.compile row; ``with_compile=False``
    builds no torch.compile row at all (a smoke run).
    """
    device = torch.device(device_type)
    if kind == "fused_update":
        made = fused_update_cases(size[0], device, backend, set(compile_sizes) if with_compile else set())
    elif kind == "snr":
        made = snr_cases(size[0], size[1], device, backend)
    elif kind == "snr_sample":
        made = snr_sample_cases(size[0], size[1], device, backend)
    elif kind == "table":
        made = table_cases(size[0], device, backend)
    elif kind == "ema":
        made = ema_cases(size[0], size[1], device)
    elif kind == "em":
        made = em_cases(size[0], size[1], device, backend, with_compile)
    elif kind == "probes":
        made = probe_cases(size[0], size[1], device, backend, with_compile)
    else:
        made = randn_cases(size[0], device, backend)
    return {role: (name, fn, nbytes) for role, name, fn, nbytes in made}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fused_update_cases(n: int, device, backend: str, compile_sizes: set[int]):
    """(role, name, fn, bytes) for x + c*s + sigma*z at n fp32 elements (bytes: 2 reads + 1 write)."""
    x = torch.randn(1, n, device=device)
    s = torch.randn(1, n, device=device)
    out = torch.empty_like(x)
    nbytes = 3 * 4 * n

    def eager():
        return x + 0.5 * s + 0.1 * torch.randn_like(x)

    cases = [
        ("copy", "torch.add(x, s, out=o)", lambda: torch.add(x, s, out=out), nbytes),
        ("eager", "x + c*s + sigma*randn_like(x)", eager, nbytes),
        (
            "fused",
            "fused_update",
            lambda: sf.ops.fused_update(x, [(0.5, s)], noise=0.1, seed=1, step=0, backend=backend),
            nbytes,
        ),
        (
            "fused_out",
            "fused_update(out=)",
            lambda: sf.ops.fused_update(x, [(0.5, s)], noise=0.1, seed=1, step=0, out=out, backend=backend),
            nbytes,
        ),
    ]
    if n in compile_sizes:
        compiled = torch.compile(eager, dynamic=False)
        compiled()
        cases.append(("compile", "torch.compile(eager)", compiled, nbytes))
    return cases


def snr_cases(B: int, D: int, device, backend: str):
    """score_sde's LangevinCorrector step (batch norms) in eager torch vs the fused two-pass op."""
    x = torch.randn(B, D, device=device)
    g = torch.randn(B, D, device=device)
    nbytes = 4 * B * D * (2 + 3)  # pass 1 reads score; pass 2 reads x, score and writes out

    def eager():
        noise = torch.randn_like(x)
        grad_norm = torch.norm(g.reshape(B, -1), dim=-1).mean()
        noise_norm = torch.norm(noise.reshape(B, -1), dim=-1).mean()
        eps = (0.16 * noise_norm / grad_norm) ** 2 * 2
        return x + eps * g + torch.sqrt(eps * 2) * noise

    return [
        ("eager", "score_sde LangevinCorrector", eager, nbytes),
        (
            "fused",
            "snr_langevin_step(norm=batch)",
            lambda: sf.ops.snr_langevin_step(x, g, 0.16, norm="batch", seed=1, step=0, backend=backend),
            nbytes,
        ),
    ]


def table_cases(n: int, device, backend: str):
    """The one-launch step's form of the same update: coefficients from a device table row, the
    Philox step n*S + j, the seed and the non-finite flag all read on the device (what a captured
    sampler step replays), against the same-bytes copy and the float-coefficient op."""
    x = torch.randn(1, n, device=device)
    s = torch.randn(1, n, device=device)
    out = torch.empty_like(x)
    table = torch.tensor([[1.0, 0.5, 0.1]] * 8, device=device)
    row, seed = torch.tensor(3, device=device), torch.tensor(1, device=device)
    flag = torch.tensor(-1, device=device)
    nbytes = 3 * 4 * n
    return [
        ("copy", "torch.add(x, s, out=o)", lambda: torch.add(x, s, out=out), nbytes),
        ("eager", "x + c*s + sigma*randn_like(x)", lambda: x + 0.5 * s + 0.1 * torch.randn_like(x), nbytes),
        (
            "fused_out",
            "fused_update_table(out=, flag=)",
            lambda: sf.ops.fused_update_table(
                x, [s], table, row, seed=seed, draws=2, draw=1, flag=flag, out=out, backend=backend
            ),
            nbytes,
        ),
    ]


def snr_sample_cases(B: int, D: int, device, backend: str):
    """The per-sample-norm corrector (one kernel for D <= 8192) against eager torch doing the same
    and a copy moving its bytes (read x and score, write out)."""
    x = torch.randn(B, D, device=device)
    g = torch.randn(B, D, device=device)
    out = torch.empty_like(x)
    nbytes = 4 * B * D * 3

    def eager():
        noise = torch.randn_like(x)
        eps = 2 * (0.16 * noise.norm(dim=1) / g.norm(dim=1)) ** 2
        return x + eps[:, None] * g + torch.sqrt(2 * eps)[:, None] * noise

    return [
        ("copy", "torch.add(x, s, out=o)", lambda: torch.add(x, g, out=out), nbytes),
        ("eager", "per-sample LangevinCorrector", eager, nbytes),
        (
            "fused_out",
            "snr_langevin_step(norm=sample, out=)",
            lambda: sf.ops.snr_langevin_step(x, g, 0.16, seed=1, step=0, out=out, backend=backend),
            nbytes,
        ),
    ]


def _with_compile(cases: list, eager, nbytes: int, with_compile: bool = True) -> list:
    if not with_compile:
        return cases
    compiled = torch.compile(eager, dynamic=False)
    compiled()
    return [*cases, ("compile", "torch.compile(eager)", compiled, nbytes)]


def em_cases(B: int, D: int, device, backend: str, with_compile: bool = True):
    """A reverse Euler–Maruyama step x + f dt + g sqrt(|dt|) z with per-sample g [B]: eager, compiled, fused."""
    x = torch.randn(B, D, device=device)
    f = torch.randn(B, D, device=device)
    g = torch.rand(B, device=device) + 0.5
    dt = -1e-3
    nbytes = 4 * B * D * 3  # read x, f; write out

    def eager():
        return x + f * dt + g[:, None] * abs(dt) ** 0.5 * torch.randn_like(x)

    cases = [
        ("eager", "x + f dt + g sqrt|dt| randn_like(x)", eager, nbytes),
        (
            "fused",
            "euler_maruyama_step",
            lambda: sf.ops.euler_maruyama_step(x, f, g, dt, seed=1, step=0, backend=backend),
            nbytes,
        ),
    ]
    return _with_compile(cases, eager, nbytes, with_compile)


def probe_cases(B: int, D: int, device, backend: str, with_compile: bool = True):
    """Hutchinson probes: n_probes=4 Rademacher vectors per sample, eager torch vs the stream-1 op."""
    n_probes = 4
    nbytes = 4 * B * D * n_probes  # write the probes

    def eager():
        return torch.randint(0, 2, (n_probes, B, D), device=device).float() * 2 - 1

    cases = [
        ("eager", "randint(0, 2) * 2 - 1", eager, nbytes),
        (
            "fused",
            "sf.rademacher (stream 1)",
            lambda: sf.rademacher((B, n_probes * D), seed=1, step=0, device=device, backend=backend),
            nbytes,
        ),
    ]
    return _with_compile(cases, eager, nbytes, with_compile)


def randn_cases(n: int, device, backend: str):
    out = torch.empty(1, n, device=device)
    return [
        ("eager", "torch.randn(out=)", lambda: torch.randn(1, n, device=device, out=out), 4 * n),
        ("fused_out", "sf.randn(out=)", lambda: sf.randn((1, n), seed=1, out=out, backend=backend), 4 * n),
    ]


def ema_cases(n_params: int, width: int, device=None):
    """EMA of a model with n_params tensors of width^2: sf.train.EMA (one foreach kernel) vs a Python loop."""
    from scorefast.train import EMA

    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(n_params)])
    model = model.to(device or "cpu")
    ema = EMA(model, decay=0.999)
    shadow = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def loop():
        for s, p in zip(shadow, model.parameters()):
            s.mul_(0.999).add_(p.detach(), alpha=0.001)

    nbytes = 3 * 4 * n_params * width * width  # read shadow and live, write shadow
    return [("eager", "per-parameter loop", loop, nbytes), ("fused", "sf.train.EMA.update", ema.update, nbytes)]
