"""``sf.sample``: run any sampler on any SDE for a PyTorch score function."""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from . import _checks, backends, graphs, samplers
from .rng import STREAM_PRIOR, randn
from .samplers.base import Context
from .sde import VPSDE
from .sde.base import SDE, bcast

PRECISIONS = _checks.PRECISIONS
MAX_STEPS = 1 << 24  # grid times a run may have: its float64 tables stay far below a GB


def _grid(sde: SDE, steps: int, schedule, t_start, device) -> tuple[Tensor, bool]:
    """(times float64 [steps], whether it is score_sde's own grid); ``schedule`` was checked by
    ``_user_schedule`` (a user's grid of times sets ``steps`` itself).

    The default grid (``schedule=None``): score_sde's own (uniform in t, its tables) when steps =
    sde.N; otherwise Karras's rho-schedule on EDM, "quadratic" on VP and sub-VP (the quality suite:
    uniform t spends the last steps' log-SNR badly: on the quadratic grid dpm_solver++ and unipc reach
    the Monte-Carlo floor in fewer NFE and Euler-Maruyama / reverse diffusion are better at 5-10 NFE,
    while ddim / ode_euler are slightly worse at 5-10 NFE and pc / ancestral reach the floor later on
    some targets; ``schedule="uniform"`` keeps score_sde's grid at any steps), and the SDE's own grid
    elsewhere (VE: uniform in t, i.e. geometric in sigma; DiscreteVP: its integer timesteps;
    RectifiedFlow: its own).
    """
    T = float(t_start) if t_start is not None else sde.T
    if isinstance(schedule, Tensor):
        return schedule.to(device), False
    if schedule is None:
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


SCHEDULES = ("uniform", "quadratic", "karras")


def _user_schedule(sde: SDE, schedule) -> Tensor | str | None:
    """None (the default grid, see ``_grid``), "uniform", "quadratic", "karras", or the user's grid
    times as float64 [N] on the host: 1-D, at least 2 times, finite, strictly decreasing, within
    [0, T], ending where std > 0."""
    if schedule is None or (isinstance(schedule, str) and schedule == "default"):
        return None
    if isinstance(schedule, str):
        return _checks.check_choice("schedule", schedule, SCHEDULES)
    if isinstance(schedule, Tensor) and (schedule.is_complex() or schedule.dtype == torch.bool):
        raise TypeError(f"schedule: expected real times, got a {schedule.dtype} tensor")
    try:
        times = torch.as_tensor(schedule).to("cpu", torch.float64)
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as err:
        raise TypeError(
            "schedule: expected 'uniform', 'quadratic', 'karras', None or a 1-D sequence of times, "
            f"got {type(schedule).__name__}"
        ) from err
    if times.dim() != 1:
        raise ValueError(f"schedule: expected a 1-D sequence of times, got shape {tuple(times.shape)}")
    if times.numel() < 2:
        raise ValueError(f"schedule: needs at least 2 times (a start and an end), got {times.numel()}")
    if not bool(torch.isfinite(times).all()) or not bool((times[1:] < times[:-1]).all()):
        raise ValueError("schedule: a user schedule must be finite and strictly decreasing")
    first, last = float(times[0]), float(times[-1])
    if first > sde.T or last < 0:
        raise ValueError(f"schedule: times must lie in [0, T={sde.T}], got {first:.6g} ... {last:.6g}")
    if not float(sde.std(times[-1:])) > 0:
        raise ValueError(
            f"schedule: the last time {last:.6g} has no noise (std 0), where the score is undefined; "
            f"end at a time > 0 such as sde.eps = {sde.eps} (the samplers take the last step to the data end)"
        )
    return times


def _check_shape(shape) -> tuple[int, ...]:
    """[B, D...] of ints (numpy ints too; not bools or floats), B >= 0 and every D >= 1."""
    dims = _checks.check_shape("shape", shape)
    if len(dims) < 2:
        raise ValueError(f"shape: expected [B, ...] with a batch dimension and at least one feature, got {dims}")
    if dims[0] < 0 or any(size < 1 for size in dims[1:]):
        raise ValueError(f"shape: the batch must be >= 0 and every feature dimension >= 1, got {dims}")
    return dims


def _device(device, x_init) -> torch.device:
    if device is None:
        return x_init.device if isinstance(x_init, Tensor) else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: not a torch device: {device!r}") from err
    if device.type == "meta":
        raise ValueError("device: meta tensors hold no values; sample on a cpu or cuda device")
    if device.type == "cuda" and not _checks._cuda_available():
        raise ValueError(f"device: {device} requested, but CUDA is not available to this torch ({torch.__version__})")
    return device


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
        x_init, t_start: SDEdit — start from x_init noised to t_start (stream 3) instead of the prior.
        schedule: None (score_sde's own grid when steps = sde.N; otherwise Karras on EDM, "quadratic"
            on VP/sub-VP, the SDE's own grid elsewhere), "uniform" (uniform in t: score_sde's grid at
            any steps), "quadratic" (t - eps uniform in sqrt), "karras", or a 1-D tensor of times.
        precision: the network runs in fp32, bf16 or fp16 (autocast); the state x stays fp32.
        cuda_graph: on CUDA, capture one step of network + update as a CUDA graph and replay it for
            the sampler's uniform steps (``scorefast.graphs``); a step that cannot be captured warns
            once and the rest runs eagerly.  Same results either way; on CPU a no-op.  The graph is
            cached by (score_fn, sde, shape, dtype, device, sampler and options, grid, precision,
            backend): a later call with the same configuration (another seed, sample_ids, x_init
            or extra_args tensors of the same shape) replays it without capturing.  The graph reads
            the network's parameters in place; ``sf.graphs.clear_cache()`` after replacing one.
        return_info: also return {"nfe", "x_mean", "time_s", "sampler", "steps", "cpu_time_s" (the
            loop's host CPU time before the final device read), "graphed" (steps were replayed)}.
        dtype: the state's dtype (float32; float64 runs the torch reference backend, for validation).
    Returns samples [shape] (fp32), or (samples, info).
    """
    plan = _plan(**locals())  # every argument checked before any work
    module, shape, device, options = plan.module, plan.shape, plan.device, plan.options
    if shape[0] == 0:  # nothing to sample: no network call (everything above was still checked)
        return _empty(plan, return_info)
    x = _initial(sde, shape, x_init, plan.t0, seed, plan.ids, device, backend, dtype)
    ctx = Context(
        score_fn=score_fn,
        sde=sde,
        times=plan.times,
        seed=plan.seed,
        sample_ids=plan.ids,
        draws=samplers.draws_per_step(module, options) + (1 if _project is not None else 0),
        backend=backend,
        extra_args=plan.extra,
        callback=callback,
        autocast_dtype=PRECISIONS[precision],
        score_sde_tables=plan.own,
        project=_project,
        graph=graphs.mode_for(device, cuda_graph),
    )
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan.times), desc=f"{sampler}", unit="step")
        ctx._progress = bar
    try:
        cpu_start = time.thread_time()
        with graphs.configuration(_graph_key(plan, score_fn, sde, precision, backend, dtype, ctx)):
            x = module.run(ctx, x, **options)
        cpu_time = time.thread_time() - cpu_start  # host work of the loop, before the one device read
        ctx.finish(x)
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
        "steps": len(plan.times),
        "draws_per_step": ctx.draws,
        "cpu_time_s": cpu_time,
        "graphed": ctx.captured,
    }
    if ctx.per_sample_nfe is not None:
        info["nfe_per_sample"] = ctx.per_sample_nfe
    return x, info


def _graph_key(plan: _Plan, score_fn, sde, precision: str, backend, dtype, ctx: Context) -> tuple | None:
    """The key a captured step is cached under (``scorefast.graphs``): everything that shapes the graph.
    The seed, sample ids, initial state and tensor extra_args are not in it: they are copied into the
    graph's static inputs by every run.  None (no caching) when not graphing or a value has no key."""
    if ctx.graph is None or ctx.project is not None:
        return None
    return graphs.config_key(
        score_fn,
        sde,
        sampler=plan.module.NAME,
        options=plan.options,
        shape=plan.shape,
        dtype=dtype,
        device=plan.device,
        times=plan.times,
        own=plan.own,
        precision=precision,
        backend=backend,
        draws=ctx.draws,
        extra=plan.extra,
    )


def check_arguments(score_fn: Callable, sde: SDE, shape: Sequence[int], **kwargs) -> None:
    """Raise what ``sample(score_fn, sde, shape, **kwargs)`` raises for a bad argument (a ValueError
    or TypeError naming it), without calling ``score_fn`` or sampling: for callers that must refuse a
    bad call before writing anything (a sharded run's manifest)."""
    bound = inspect.signature(sample).bind(score_fn, sde, shape, **kwargs)
    bound.apply_defaults()
    _plan(**bound.arguments)


@dataclass
class _Plan:
    """What ``sample`` checked and derived before any work."""

    module: ModuleType
    shape: tuple[int, ...]
    device: torch.device
    options: dict
    ids: Tensor
    seed: int | Tensor
    extra: dict
    times: Tensor
    own: bool
    t0: float


def _plan(
    *,
    score_fn,
    sde,
    shape,
    sampler,
    steps,
    seed,
    sample_ids,
    x_init,
    t_start,
    schedule,
    extra_args,
    device,
    precision,
    cuda_graph,
    progress,
    callback,
    return_info,
    backend,
    dtype,
    sampler_options,
    _project=None,
) -> _Plan:
    """Every argument of ``sample`` checked (a ValueError/TypeError naming it), nothing sampled."""
    module = samplers.get(sampler)
    if not isinstance(sde, SDE):
        raise TypeError(f"sde: expected a scorefast.sde SDE, got {type(sde).__name__}")
    if not callable(score_fn):
        raise TypeError("score_fn: must be callable as score_fn(x, t, **extra_args)")
    shape = _check_shape(shape)
    if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype: the sampler state is float32 (or float64 for references), got {dtype}")
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    for name, flag in (("cuda_graph", cuda_graph), ("progress", progress), ("return_info", return_info)):
        _checks.check_bool(name, flag)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a callable callback(info_dict) or None, got {type(callback).__name__}")
    options = samplers.validate(module, sde, sampler_options)
    schedule = _user_schedule(sde, schedule)
    if isinstance(schedule, Tensor):  # the user's grid sets the number of steps
        if steps is not None and _checks.check_int("steps", steps) != schedule.numel():
            raise ValueError(f"steps: {steps} does not match the schedule's {schedule.numel()} times")
        steps = schedule.numel()
    steps = _checks.check_int("steps", module.DEFAULT_STEPS if steps is None else steps, minimum=1)
    if module.KIND == "ode" and steps < 2:
        raise ValueError(f"steps: {sampler} integrates between grid times and needs steps >= 2")
    draws = samplers.draws_per_step(module, options) + 1  # + a conditional wrapper's draw
    if steps > MAX_STEPS or steps * draws >= _checks.UINT32:
        raise ValueError(
            f"steps: {steps} is more than a run can hold (at most {MAX_STEPS} grid times, and "
            f"steps x draws per step below 2**32, the noise counter's range)"
        )
    device = _device(device, x_init)
    backends.resolve(backend, device, dtype)  # a backend that cannot run says so before any work
    ids = _checks.check_sample_ids(sample_ids, shape[0], device)
    seed_checked = _checks.check_counter("seed", seed, device, upper=_checks.UINT64)
    extra = _checks.check_extra_args(extra_args, shape[0])
    if t_start is not None:
        t_start = _checks.check_finite_scalar("t_start", t_start, positive=True)
        if not sde.eps < t_start <= sde.T:
            raise ValueError(f"t_start: must lie in (eps={sde.eps}, T={sde.T}], got {t_start}")
        if x_init is None:
            raise ValueError(
                "t_start: needs x_init (SDEdit: x_init is noised to t_start, then denoised); without data "
                "there is no law to start from at t_start: leave t_start unset to start from the prior at T"
            )
        if isinstance(schedule, Tensor) and not math.isclose(float(schedule[0]), t_start, rel_tol=1e-12):
            raise ValueError(f"t_start: {t_start} is not the schedule's first time {float(schedule[0])}")
    if x_init is not None:
        _check_x_init(x_init, shape)
    times, own = _grid(sde, steps, schedule, t_start, device)
    t0 = t_start if t_start is not None else float(times[0])
    return _Plan(module, shape, device, options, ids, seed_checked, extra, times, own, t0)


def _empty(plan: _Plan, return_info: bool):
    """The result of a batch of 0: an empty [0, ...] tensor (and the info of no work)."""
    x = torch.empty(plan.shape, dtype=torch.float32, device=plan.device)
    if not return_info:
        return x
    info = {
        "nfe": 0,
        "x_mean": math.nan,
        "time_s": 0.0,
        "sampler": plan.module.NAME,
        "steps": len(plan.times),
        "draws_per_step": samplers.draws_per_step(plan.module, plan.options),
        "cpu_time_s": 0.0,
        "graphed": False,
    }
    if plan.module.NAME == "rk45":
        info["nfe_per_sample"] = torch.zeros(0, dtype=torch.int64, device=plan.device)
    return x, info


def _check_x_init(x_init, shape) -> None:
    _checks.check_float_tensor("x_init", x_init)
    if tuple(x_init.shape) != tuple(shape):
        raise ValueError(f"x_init: shape {tuple(x_init.shape)} does not match shape {tuple(shape)}")
    if x_init.device.type == "meta":
        raise ValueError("x_init: a meta tensor holds no data")
    if x_init.numel() and not bool(torch.isfinite(x_init).all()):  # one host read per run
        raise ValueError("x_init: contains NaN or inf")


def _initial(sde: SDE, shape, x_init, t0: float, seed, ids, device, backend, dtype) -> Tensor:
    if x_init is None:
        return sde.prior_sampling(shape, seed=seed, sample_ids=ids, device=device, backend=backend, dtype=dtype)
    x0 = x_init.to(device=device, dtype=dtype)
    t = torch.full((shape[0],), t0, dtype=torch.float64, device=device)
    mean, std = sde.marginal_prob(x0, t)
    z = randn(
        shape, seed=seed, step=0, stream=STREAM_PRIOR, sample_ids=ids, device=device, backend=backend, dtype=dtype
    )
    return mean + bcast(std.double(), x0) * z
