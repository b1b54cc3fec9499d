"""The step contract every sampler shares (one sampler a file, torchsde-style).

A sampler module defines ``NAME``, ``DRAWS`` (S: noise draws per step, so draw j of step n uses
Philox step k = n*S + j on stream 0 — no two draws of a run share a counter), ``DEFAULT_STEPS``,
``KIND`` ("sde" steps from each of the N grid times; "ode" integrates the N-1 intervals and ends
with a Tweedie step), and ``run(ctx, x, **options) -> x``.  Samplers are plain PyTorch calling
``scorefast.ops``, so one sampler runs on every backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import _checks
from ..backends import resolve
from ..errors import NonFiniteError
from ..ops.fused_update import apply
from ..rng import STREAM_SAMPLER
from ..sde.base import as_time

CHECK_EVERY = 50  # read the non-finite flag on the host every K steps when not capturing
Step = int | Tensor  # a step index: a Python int (eager) or a 0-d int64 tensor on the device (graphs)


def as_carry(out) -> tuple[Tensor, ...]:
    """A step body's result (a tensor or a tuple of tensors) as a tuple."""
    return (out,) if isinstance(out, Tensor) else tuple(out)


class StepTable:
    """Per-step values [N, K] (float64, computed once per run) read as ``table[n]``.

    ``table[n]`` is a tuple of K Python floats for an int n on CPU, and of K 0-d device tensors for
    a device step index: that is what a captured step reads, so one graph replays every step.  On a
    GPU eager steps read device rows too, so no step copies its coefficients host-to-device (a
    pageable copy would stall the host until the GPU caught up).
    """

    def __init__(self, rows: Tensor, device: torch.device, on_device: bool):
        self.host = [tuple(r) for r in rows.tolist()]
        self.dev = rows.to(device) if on_device or device.type != "cpu" else None
        self._dev_rows = [tuple(r.unbind(0)) for r in self.dev] if device.type != "cpu" else None

    def __len__(self) -> int:
        return len(self.host)

    def __getitem__(self, n: Step) -> tuple:
        if isinstance(n, Tensor):
            return tuple(torch.index_select(self.dev, 0, n.reshape(1))[0].unbind(0))
        return self._dev_rows[n] if self._dev_rows is not None else self.host[n]


def _finite_witness(s: Tensor) -> Tensor:
    """A 0-d tensor that is finite exactly when every entry of s is: the float64 sum (no fp32 or
    fp16 value can overflow it), one reduction where isfinite + all costs several times more.
    Empty s gives 0 (finite)."""
    if s.device.type == "mps":  # no float64 there
        return torch.where(torch.isfinite(s).all(), 0.0, float("nan"))
    return torch.sum(s, dtype=torch.float64)


_SCORE_DTYPES = _checks.FLOAT_DTYPES


def _check_score(s: object, x: Tensor) -> None:
    """score_fn's output must be a float tensor shaped like x on x's device: the fused kernels read it
    beside x (another device's memory would crash them), and an int, bool or complex score is a bug
    that a silent cast would hide."""
    _checks.check_like("score_fn", s, x, other="the state x")


def denoise_only(sde, *, denoise) -> dict:
    """``validate`` of a sampler whose one option is ``denoise``."""
    return {"denoise": _checks.check_bool("denoise", denoise)}


@dataclass
class Context:
    """What a sampler needs: the wrapped score, the SDE, the grid and the noise counter."""

    score_fn: Callable
    sde: object
    times: Tensor  # float64 [N] grid, decreasing
    seed: int | Tensor
    sample_ids: Tensor
    draws: int
    backend: str | None = None
    extra_args: dict = field(default_factory=dict)
    callback: Callable | None = None
    autocast_dtype: torch.dtype | None = None
    score_sde_tables: bool = False
    nfe: int = 0
    per_sample_nfe: Tensor | None = None  # adaptive solvers
    project: Callable | None = None  # conditional wrappers: project(ctx, x, n, t) -> x after step n
    _backend_name: str | None = None
    _finite: list = field(default_factory=list)  # eager steps: (step, t, score sum) until the next check
    _first_bad: Tensor | None = None
    _bad_time: Tensor | None = None
    _step: Step = 0
    _progress: object = None
    graph: str | None = None  # None (eager), "cuda" (CUDA graphs) or "fx" (the CPU emulation used by tests)
    captured: bool = False  # some steps were replayed from a captured graph
    _recorded: tuple | None = None  # the callback's tensors of a step being captured
    _times: StepTable | None = None
    _tweedie: StepTable | None = None
    _time_in: tuple | None = None  # eager: (t tensor, its version, float64 [B], in x's dtype) of the last one

    # -- per-step tables ------------------------------------------------------------------
    def table(self, rows) -> StepTable:
        """Per-step values: rows [N, K] (a float64 tensor or N tuples), kept on the device when graphing."""
        rows = torch.as_tensor(rows, dtype=torch.float64)
        if rows.dim() == 1:
            rows = rows[:, None]
        return StepTable(rows, self.times.device, on_device=self.graph is not None)

    def time(self, n: Step) -> float | Tensor:
        """Grid time t_n: a float, or a [1] float64 device tensor for a device step index."""
        if self._times is None:
            self._times = self.table(self.times.to("cpu", torch.float64))
        return self._times[n][0]

    # -- score evaluations ----------------------------------------------------------------
    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        """score_fn(x, t [B] in the SDE's time, **extra_args); counts NFE, flags NaN/inf.

        The score comes back in x's dtype, except that a bf16/fp16 score of an fp32 state is kept as
        it is: every fused op reads it directly and does its arithmetic in fp32."""
        if isinstance(t, float):  # an eager step's grid time: made in x's dtype at once (one rounding)
            t_in = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        elif self._reuse_time(t, x):
            t, t_in = self._time_in[2:]  # the same, unmodified time tensor as the last call (Langevin's t)
        else:
            source = t
            t = as_time(t, x)
            t_in = t.to(x.dtype)
            if self.graph is None and isinstance(source, Tensor):  # a replay may rewrite a buffer unseen
                self._time_in = (source, source._version, t, t_in)
        if self.autocast_dtype is not None:
            # no cast cache under graphs: cached weight casts must not live in a capture's pool
            with torch.autocast(x.device.type, dtype=self.autocast_dtype, cache_enabled=self.graph is None):
                s = self.score_fn(x, t_in, **self.extra_args)
        else:
            s = self.score_fn(x, t_in, **self.extra_args)
        if type(s) is not Tensor or s.shape != x.shape or s.device != x.device or s.dtype not in _SCORE_DTYPES:
            _check_score(s, x)  # one cheap check per call; names the problem (a Tensor subclass passes)
        self.nfe += 1
        if s.dtype in (torch.bfloat16, torch.float16) and x.dtype == torch.float32:
            return s  # the fused ops read low-precision scores directly (fp32 arithmetic, no extra pass)
        return s.to(x.dtype) if s.dtype != x.dtype else s

    def _reuse_time(self, t, x: Tensor) -> bool:
        """t is the eager call's last time tensor, unchanged since (same object and version)."""
        last = self._time_in
        return last is not None and last[0] is t and last[1] == t._version and last[3].dtype == x.dtype

    def denoised(self, x: Tensor, n: Step, score: Tensor) -> Tensor:
        """Tweedie at grid time t_n: x0 = (x + std^2 s) / mean_coef, one fused pass."""
        if self._tweedie is None:
            times = self.times.to("cpu", torch.float64)
            a, s = self.sde.mean_coef(times), self.sde.std(times)
            self._tweedie = self.table(torch.stack([s * s / a, 1.0 / a], 1))
        s_coef, x_coef = self._tweedie[n]
        return self.update(x, [(s_coef, score)], x_coef=x_coef)

    def schedule_times(self) -> tuple[Tensor, Tensor]:
        """(t_n, t_{n+1}) float64 [N] on the host, t_N = 0 (the data end): for per-run coefficient tables."""
        times = self.times.to("cpu", torch.float64)
        return times, torch.cat([times[1:], times.new_zeros(1)])

    def next_coefs(self) -> tuple[Tensor, Tensor]:
        """(mean_coef, std) float64 [N] at t_{n+1}, the last step's at the data end (1, 0).  Not the SDE
        at t = 0: DiscreteVP's grid ends at t = 0 itself, its least noisy table entry (sigma_0 > 0)."""
        _, next_times = self.schedule_times()
        a, s = self.sde.mean_coef(next_times), self.sde.std(next_times)
        a[-1], s[-1] = 1.0, 0.0
        return a, s

    # -- noise ----------------------------------------------------------------------------
    def counter(self, n: Step, j: int = 0) -> Step:
        """Philox step of draw j of step n: n*S + j (a device tensor for a device step index)."""
        if not 0 <= j < self.draws:
            raise AssertionError(f"draw {j} outside the {self.draws} declared draws")
        return n * self.draws + j

    def update(self, x: Tensor, terms, *, noise=0.0, n: Step = 0, j: int = 0, x_coef=1.0) -> Tensor:
        """fused_update on stream 0 with step n*S + j (arguments were validated once per run)."""
        return apply(
            x,
            terms,
            noise=noise,
            x_coef=x_coef,
            seed=self.seed,
            step=self.counter(n, j),
            stream=STREAM_SAMPLER,
            sample_ids=self.sample_ids,
            out=None,
            backend=self.backend_name(x),
            trusted=True,
        )

    def backend_name(self, x: Tensor) -> str:
        """The resolved backend for the state's device and dtype (resolved once)."""
        if self._backend_name is None:
            self._backend_name = resolve(self.backend, x.device, x.dtype)
        return self._backend_name

    # -- the step loop --------------------------------------------------------------------
    def steps(self, body: Callable, carry, start: int, stop: int, *, done: Callable | None = None):
        """carry = body(n, *carry) for n in [start, stop): the sampler's uniform steps.

        ``carry`` is a tensor or a tuple of tensors (the state first).  With ``graph`` set, the
        body is called with a device step index, captured once and replayed (``scorefast.graphs``);
        ``body`` must then read every per-step value from tables (``table``, ``time``, ``counter``).
        ``done(carry) -> bool`` (a host read) ends the loop early: checked before every eager step
        and every ``graphs.CHECK_DONE_EVERY`` replays; a step after done must change nothing.
        """
        single = isinstance(carry, Tensor)
        carry = as_carry(carry)
        first = start
        if self.graph is not None and stop - start >= 3 and not (done is not None and done(carry)):
            from ..graphs import run_steps

            self._device_flags(carry[0].device)  # a captured body need not reach step_done (rk45's attempts)

            carry, first = run_steps(self, body, carry, start, stop, done)
        for n in range(first, stop):
            if done is not None and done(carry):
                break
            self._step = n
            carry = as_carry(body(n, *carry))
        return carry[0] if single else carry

    # -- bookkeeping ----------------------------------------------------------------------
    def step_done(self, n: Step, x: Tensor, t, denoised: Tensor | None = None) -> Tensor:
        """After step n (taken from time t): the finite witness of the new state, the conditional
        projection, callback, progress, checks.

        The witness is of the state, not of the scores: a NaN/inf score reaches the state through the
        fused update (0 * NaN is NaN), and so does a finite score too large for the state's dtype,
        which a check of the score alone misses.  One reduction per step, however many NFE it takes.
        """
        self._flag(_finite_witness(x), t, n)
        if self.project is not None:
            x = self.project(self, x, n, t)
        if isinstance(n, Tensor):  # a device step (graphs): the host side runs after each replay
            self._recorded = (x, t, denoised)
            return x
        self._step = n + 1
        self.report(n, x, t, denoised)
        if not _checks.is_capturing_or_compiling() and (n + 1) % CHECK_EVERY == 0:
            self.check_finite()
        return x

    def report(self, n: int, x: Tensor, t, denoised: Tensor | None) -> None:
        """The host side of step n: callback and progress bar."""
        if self.callback is not None:
            t = as_time(t, x)
            self.callback({"x": x, "i": n, "t": t, "sigma": t, "denoised": denoised})
        if self._progress is not None:
            self._progress.update(1)

    def _flag(self, total: Tensor, t: Tensor | float, n: Step) -> None:
        """Record whether step n's state was finite (its float64 sum is), without a host read.

        Eager steps keep (step, t, sum) in a list (no further device work); a device step (graphs)
        updates a first-bad-step flag in place, so every replay of a graph keeps updating it.
        """
        if not isinstance(n, Tensor):
            self._finite.append((n, t, total))
            return
        finite = torch.isfinite(total)
        self._device_flags(finite.device)
        fresh = ~finite & (self._first_bad < 0)
        self._first_bad.copy_(torch.where(fresh, n, self._first_bad))
        self._bad_time.copy_(torch.where(fresh, t.reshape(-1)[0] if isinstance(t, Tensor) else t, self._bad_time))

    def finish(self, x: Tensor) -> None:
        """After the run: the samples themselves are finite too (a last update that no step_done saw,
        such as NCSNv2's final_denoise, included), then the flags are read (one host sync)."""
        self._flag(_finite_witness(x), self.times[-1], len(self.times) - 1)
        self.check_finite()

    def _device_flags(self, device: torch.device) -> None:
        """The device-side first-bad-step flag and its time (graphs), made once per run."""
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.int64, device=device)
            self._bad_time = torch.zeros((), dtype=torch.float64, device=device)

    def check_finite(self) -> None:
        """Read the non-finite flags (one host sync) and raise NonFiniteError naming the first bad step."""
        bad = []
        if self._finite:
            flags = torch.isfinite(torch.stack([total for _, _, total in self._finite]))
            if not bool(flags.all()):
                step, t, _ = self._finite[int((~flags).nonzero()[0, 0])]
                bad.append((step, float(t.reshape(-1)[0]) if isinstance(t, Tensor) else float(t)))
            self._finite.clear()
        if self._first_bad is not None and int(self._first_bad) >= 0:
            bad.append((int(self._first_bad), float(self._bad_time)))
        if bad:
            step, t = min(bad)
            raise NonFiniteError(
                f"non-finite samples at step {step} (t = {t:.6g}): score_fn returned NaN/inf there, or a "
                "finite score too large for the state's dtype overflowed the update"
            )

    def t_vec(self, t: float | Tensor, x: Tensor) -> Tensor:
        return as_time(t, x)
