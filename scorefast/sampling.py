"""``sf.sample``: run any sampler on any SDE for a PyTorch score function."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import _checks, graphs, samplers
from .rng import STREAM_PRIOR, randn
from .samplers.base import Context
from .sde import VPSDE
from .sde.base import SDE, bcast

PRECISIONS = _checks.PRECISIONS


def _grid(sde: SDE, steps: int, schedule, t_start, device) -> tuple[Tensor, bool]:
    """(times float64 [steps], whether it is score_sde's own grid).

    The default grid (``schedule=None``): score_sde's own (uniform in t, its tables) when steps = sde.N;
    otherwise Karras's rho-schedule on EDM, "quadratic" on VP and sub-VP (the quality suite: uniform
    t spends the last steps' log-SNR badly, and at 10-20 NFE quadratic wins for dpm_solver++, unipc,
    heun, pc and the Euler-Maruyama / reverse-diffusion predictors; ``schedule="uniform"`` keeps the
    old grid), and the SDE's own grid elsewhere (VE: uniform in t, i.e. geometric in sigma).
    """
    T = float(t_start) if t_start is not None else sde.T
    if isinstance(schedule, Tensor | Sequence) and not isinstance(schedule, str):
        times = torch.as_tensor(schedule, dtype=torch.float64, device=device).flatten()
        if times.numel() < 1 or not bool((times[1:] < times[:-1]).all()) or not bool(torch.isfinite(times).all()):
            raise ValueError("schedule: a user schedule must be finite and strictly decreasing")
        return times, False
    if schedule in (None, "default"):
        own = t_start is None and steps == getattr(sde, "N", -1) and not hasattr(sde, "rho")
        if isinstance(sde, VPSDE) and not own:
            schedule = "quadratic"
        elif t_start is None:
            return sde.grid(steps, device=device), own
        else:
            schedule = "karras" if hasattr(sde, "rho") else "uniform"
    if schedule == "uniform":
        return torch.linspace(T, sde.eps, steps, dtype=torch.float64, device=device), False
    if schedule == "quadratic":  # DPM-Solver's "time_quadratic": t - eps uniform in its square root
        u = torch.linspace(1, 0, steps, dtype=torch.float64, device=device)
        times = sde.eps + (T - sde.eps) * u**2
        times[0] = T
        return times, False
    if schedule == "karras":
        from .sde.edm import karras_sigmas

        rho = getattr(sde, "rho", 7.0)
        lo, hi = (
            float(sde.std(torch.tensor([sde.eps], dtype=torch.float64))),
            float(sde.std(torch.tensor([T], dtype=torch.float64))),
        )
        sig = karras_sigmas(steps, lo, hi, rho, device)
        if hasattr(sde, "rho"):
            return sig, False
        # invert sigma -> t numerically on a fine grid (monotone)
        fine = torch.linspace(T, sde.eps, 100_001, dtype=torch.float64, device=device)
        s_fine = sde.std(fine)
        idx = torch.searchsorted(s_fine.flip(0), sig).clamp(1, fine.numel() - 1)
        f = fine.flip(0)
        sf_ = s_fine.flip(0)
        w = (sig - sf_[idx - 1]) / (sf_[idx] - sf_[idx - 1])
        return f[idx - 1] + w * (f[idx] - f[idx - 1]), False
    raise ValueError(
        f"schedule: expected 'uniform', 'quadratic', 'karras', None or a tensor of times, got {schedule!r}"
    )


def sample(
    score_fn: Callable,
    sde: SDE,
    shape: Sequence[int],
    *,
    sampler: str = "pc",
    steps: int | None = None,
    seed: int | Tensor = 0,
    sample_ids: Tensor | None = None,
    x_init: Tensor | None = None,
    t_start: float | None = None,
    schedule=None,
    extra_args: dict | None = None,
    device=None,
    precision: str = "fp32",
    cuda_graph: bool = False,
    progress: bool = False,
    callback: Callable | None = None,
    return_info: bool = False,
    backend: str | None = None,
    dtype: torch.dtype = torch.float32,
    _project: Callable | None = None,
    **sampler_options,
):
    """Draw samples [shape] by integrating the reverse SDE/ODE of ``sde`` with ``score_fn``.

    Args:
        score_fn: ``score_fn(x, t, **extra_args) -> score`` shaped like x, t [B] in the SDE's time.
        shape: [B, ...]; B samples with global ids ``sample_ids`` (default arange(B)).
        steps: number of grid times N (None: the sampler's default); see DESIGN.md for NFE.
        schedule: None (the default grid: score_sde's own when steps = sde.N, Karras's on EDM,
            "quadratic" on VP / sub-VP, uniform in t elsewhere), "uniform", "quadratic", "karras", or
            a decreasing tensor of times.
        x_init, t_start: SDEdit — start from x_init noised to t_start (stream 3) instead of the prior.
        precision: the network runs in fp32, bf16 or fp16 (autocast); the state x stays fp32.
        cuda_graph: on CUDA, capture one step of network + update as a CUDA graph and replay it for
            the sampler's uniform steps (``scorefast.graphs``); a step that cannot be captured warns
            once and the rest runs eagerly.  Same results either way; on CPU a no-op.
        return_info: also return {"nfe", "x_mean", "time_s", "sampler", "steps", "cpu_time_s" (the
            loop's host CPU time before the final device read), "graphed" (steps were replayed)}.
        dtype: the state's dtype (float32; float64 runs the torch reference backend, for validation).
    Returns samples [shape] (fp32), or (samples, info).
    """
    module = samplers.get(sampler)
    if not isinstance(sde, SDE):
        raise TypeError(f"sde: expected a scorefast.sde SDE, got {type(sde).__name__}")
    if not callable(score_fn):
        raise TypeError("score_fn: must be callable as score_fn(x, t, **extra_args)")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"shape: expected [B, ...] with a batch dimension and at least one feature, got {shape}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype: the sampler state is float32 (or float64 for references), got {dtype}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    steps = module.DEFAULT_STEPS if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: must be an int >= 1, got {steps!r}")
    if module.KIND == "ode" and steps < 2:
        raise ValueError(f"steps: {sampler} integrates between grid times and needs steps >= 2")
    _check_options(module, sampler_options)
    device = (
        torch.device(device) if device is not None else (x_init.device if x_init is not None else torch.device("cpu"))
    )
    B = shape[0]
    ids = _checks.check_sample_ids(sample_ids, B, device)
    seed_checked = _checks.check_counter("seed", seed, device, upper=_checks.UINT64)
    extra = _slice_extra(extra_args, B)
    if t_start is not None:
        t_start = _checks.check_finite_scalar("t_start", t_start, positive=True)
        if not sde.eps < t_start <= sde.T:
            raise ValueError(f"t_start: must lie in (eps={sde.eps}, T={sde.T}], got {t_start}")
    times, own = _grid(sde, steps, schedule, t_start, device)
    t0 = t_start if t_start is not None else float(times[0])
    x = _initial(sde, shape, x_init, t0, seed, ids, device, backend, dtype)
    ctx = Context(
        score_fn=score_fn,
        sde=sde,
        times=times,
        seed=seed_checked,
        sample_ids=ids,
        draws=samplers.draws_per_step(module, sampler_options) + (1 if _project is not None else 0),
        backend=backend,
        extra_args=extra,
        callback=callback,
        autocast_dtype=PRECISIONS[precision],
        score_sde_tables=own,
        project=_project,
        graph=graphs.mode_for(device, cuda_graph),
    )
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(times), desc=f"{sampler}", unit="step")
        ctx._progress = bar
    try:
        cpu_start = time.thread_time()
        x = module.run(ctx, x, **sampler_options)
        cpu_time = time.thread_time() - cpu_start  # host work of the loop, before the one device read
        ctx.check_finite()
    finally:
        if bar is not None:
            bar.close()
    if not return_info:
        return x
    info = {
        "nfe": ctx.nfe if ctx.per_sample_nfe is None else int(ctx.per_sample_nfe.max()),
        "x_mean": x.mean().item(),
        "time_s": time.perf_counter() - start,
        "sampler": sampler,
        "steps": steps,
        "draws_per_step": ctx.draws,
        "cpu_time_s": cpu_time,
        "graphed": ctx.captured,
    }
    if ctx.per_sample_nfe is not None:
        info["nfe_per_sample"] = ctx.per_sample_nfe
    return x, info


def _check_options(module, options: dict) -> None:
    params = inspect.signature(module.run).parameters
    allowed = [p for p in params if p not in ("ctx", "x")]
    for key in options:
        if key not in allowed:
            raise TypeError(f"{key}: not an option of sampler {module.NAME!r} (options: {', '.join(allowed)})")


def _slice_extra(extra_args: dict | None, B: int) -> dict:
    extra = dict(extra_args or {})
    for key, value in extra.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] != B:
            raise ValueError(f"extra_args[{key!r}]: batch {value.shape[0]} does not match {B} samples")
    return extra


def _initial(sde: SDE, shape, x_init, t0: float, seed, ids, device, backend, dtype) -> Tensor:
    if x_init is None:
        return sde.prior_sampling(shape, seed=seed, sample_ids=ids, device=device, backend=backend, dtype=dtype)
    _checks.check_float_tensor("x_init", x_init)
    if tuple(x_init.shape) != tuple(shape):
        raise ValueError(f"x_init: shape {tuple(x_init.shape)} does not match shape {tuple(shape)}")
    x0 = x_init.to(device=device, dtype=dtype)
    t = torch.full((shape[0],), t0, dtype=torch.float64, device=device)
    mean, std = sde.marginal_prob(x0, t)
    z = randn(
        shape, seed=seed, step=0, stream=STREAM_PRIOR, sample_ids=ids, device=device, backend=backend, dtype=dtype
    )
    return mean + bcast(std.double(), x0) * z
