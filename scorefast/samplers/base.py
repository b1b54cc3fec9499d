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
from ..ops import _common
from ..ops.fused_update import MAX_TERMS, apply, fused_update_table
from ..rng import STREAM_SAMPLER
from ..sde.base import as_time

CHECK_EVERY = 50  # read the non-finite flag on the host every K steps when not capturing
Step = int | Tensor  # a step index: a Python int (eager) or a 0-d int64 tensor on the device (graphs)


def as_carry(out) -> tuple[Tensor, ...]:
    """A step body's result (a tensor or a tuple of tensors) as a tuple."""
    return (out,) if isinstance(out, Tensor) else tuple(out)


class StepTable:
    """Per-step values [N, K] (float64, computed once per run).

    ``table[n]`` is a tuple of K Python floats for an int n on CPU, and of K 0-d device tensors for
    a device step index (per-sample coefficient updates and times).  The one-launch step reads its
    coefficients with ``packed(cols, ...)``: a contiguous fp32 (fp64 for float64 states) device table
    [N, len(cols)] that the fused kernel indexes itself with the step counter, so a step copies or
    indexes no coefficient outside the update's own launch.
    """

    def __init__(self, rows: Tensor, device: torch.device, on_device: bool):
        self.rows = rows
        self.host = [tuple(r) for r in rows.tolist()]
        self.device = device
        self.dev = rows.to(device) if on_device or device.type != "cpu" else None
        self._dev_rows = [tuple(r.unbind(0)) for r in self.dev] if device.type != "cpu" else None
        self._packed: dict = {}

    def __len__(self) -> int:
        return len(self.host)

    def __getitem__(self, n: Step) -> tuple:
        if isinstance(n, Tensor):
            return tuple(torch.index_select(self.dev, 0, n.reshape(1))[0].unbind(0))
        return self._dev_rows[n] if self._dev_rows is not None else self.host[n]

    def packed(self, cols: tuple, dtype: torch.dtype) -> Tensor:
        """Columns ``cols`` (an int: a column of this table; a float: that constant) as a contiguous
        [N, len(cols)] device table of ``dtype``, made once per run and cached."""
        return self.folded(tuple(((c, (None, None)),) for c in cols), dtype)

    def folded(self, coefs: tuple, dtype: torch.dtype) -> Tensor:
        """A packed table whose column k is sum_i value(spec_i) * factor_i over coefs[k] (``_fold``):
        spec a column of this table or a constant, factor None or an affine score's a or b (float64
        [>= N], per run), summed in float64 and rounded once to ``dtype``; cached."""
        key = (tuple(tuple((spec, f[0]) for spec, f in col) for col in coefs), dtype)
        if key not in self._packed:
            N = self.rows.shape[0]
            parts = []
            for col in coefs:
                acc = torch.zeros(N, dtype=torch.float64)
                for spec, (_, factor) in col:
                    v = self.rows[:, spec] if isinstance(spec, int) else torch.full((N,), float(spec), dtype=acc.dtype)
                    acc = acc + (v if factor is None else v * factor[:N])
                parts.append(acc)
            self._packed[key] = torch.stack(parts, 1).to(dtype).contiguous().to(self.device)
        return self._packed[key]


class TimeTable:
    """Per-step times [N] (float64 on the host; a copy in each state dtype on the device, made once).

    ``at(n)`` is the time of step n: ``ctx.score`` gives the network ``index_select(net, n)`` (one op,
    the same for an int and a device n), the error message and the callback read the float64 value.
    """

    def __init__(self, times: Tensor, device: torch.device):
        self.times = times.to("cpu", torch.float64)
        self.host = self.times.tolist()
        self.device = device
        self._net: dict = {}
        self._dev64: Tensor | None = None

    def net(self, dtype: torch.dtype) -> Tensor:
        """The times in ``dtype`` on the device [N] (one rounding from float64, as ``torch.full``)."""
        if dtype not in self._net:
            self._net[dtype] = self.times.to(dtype).to(self.device)
        return self._net[dtype]

    def rounded(self, dtype: torch.dtype) -> Tensor:
        """The float64 times as the network sees them: rounded once to ``dtype`` (the time input's)."""
        return self.times.to(dtype).to(torch.float64)

    def mapped(self, key, fn, dtype: torch.dtype) -> Tensor:
        """fn(times rounded to dtype) (float64 [N] on the host), made once per key."""
        if key not in self._net:
            self._net[key] = fn(self.rounded(dtype))
        return self._net[key]

    def dev64(self) -> Tensor:
        if self._dev64 is None:
            self._dev64 = self.times.to(self.device)
        return self._dev64

    def at(self, n: Step) -> StepTime:
        return StepTime(self, n)


@dataclass(frozen=True)
class AffineScore:
    """The score of step n left unformed: score = a(t_n) x + b(t_n) out, with out the network's own
    output (bf16/fp16 allowed) and a, b per-run float64 [N] of the step's times (an adapter's
    ``affine_coefs``).  The update that reads it folds a and b into its table's coefficients, so the
    fused kernel reads ``out`` once; any other use forms it first (``Context.formed``)."""

    out: Tensor
    x: Tensor
    a: Tensor
    b: Tensor
    uses_x: bool  # some a is not 0 (eps and score parameterisations have a = 0)
    n: Step
    key: tuple  # identifies (a, b) in the packed tables' cache


@dataclass(frozen=True)
class StepTime:
    """The time of step n of a ``TimeTable``: what ``ctx.time(n)`` returns and ``ctx.score`` reads."""

    table: TimeTable
    n: Step

    def host(self) -> float:
        """float64 value for an int step (no device read)."""
        return self.table.host[self.n]

    def value(self, x: Tensor) -> Tensor:
        """float64 [B] on x's device (a host number for an int step; one index_select for a device one)."""
        if isinstance(self.n, Tensor):
            return as_time(torch.index_select(self.table.dev64(), 0, self.n.reshape(1)), x)
        return as_time(self.host(), x)


def affine_coefs_at(fn, times: Tensor) -> tuple[Tensor, Tensor]:
    """An adapter's (a, b) at ``times`` (any shape: a run's [N], rk45's [S, B], adaptive_sde's [2, B]) as
    contiguous float64 tensors of times' shape on times' device.  Each may come back as a number, a 0-d
    tensor or a tensor of times' shape; any other shape is a ValueError (a [B] result would broadcast
    one time's coefficients onto the others)."""

    def at(v) -> Tensor:
        v = torch.as_tensor(v, dtype=torch.float64, device=times.device)
        if v.dim() != 0 and v.shape != times.shape:
            raise ValueError(
                f"score_fn: affine_coefs(t) returned shape {tuple(v.shape)} for times of shape {tuple(times.shape)}"
            )
        return v.expand(times.shape).contiguous()

    a, b = fn.affine_coefs(times)
    return at(a), at(b)


def _affine_coefs(fn, times: Tensor) -> tuple[Tensor, Tensor, bool]:
    """An adapter's (a, b) at the per-run times (float64 [N], host) and whether a is ever non-zero."""
    a, b = affine_coefs_at(fn, times)
    return a, b, bool((a != 0).any())


def _fold(x: Tensor, terms: list, cols: tuple) -> tuple[list[Tensor], list]:
    """The tensors an update reads (x first) and, per tensor then the noise, its coefficient as a list
    of (column spec, (key, factor)) products: an ``AffineScore`` term with column c adds c*b to its
    output's coefficient and c*a to that of its x (a tensor already read, or one more term)."""
    tensors, coefs = [x], [[(cols[0], (None, None))]]

    def add(tensor, spec, factor):
        for i, t in enumerate(tensors):
            if t is tensor:
                coefs[i].append((spec, factor))
                return
        tensors.append(tensor)
        coefs.append([(spec, factor)])

    for term, spec in zip(terms, cols[1:-1], strict=True):
        if isinstance(term, AffineScore):
            add(term.out, spec, (("b", term.key), term.b))
            if term.uses_x:
                add(term.x, spec, (("a", term.key), term.a))
        else:
            add(term, spec, (None, None))
    coefs.append([(cols[-1], (None, None))])
    return tensors, coefs


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
    _step_times: dict = field(default_factory=dict)  # eager steps since the last check: n -> time (messages)
    _final: Tensor | None = None  # finite witness of the samples (one reduction per run)
    _first_bad: Tensor | None = None
    _bad_time: Tensor | None = None
    _step: Step = 0
    _progress: object = None
    graph: str | None = None  # None (eager), "cuda" (CUDA graphs) or "fx" (the CPU emulation used by tests)
    captured: bool = False  # some steps were replayed from a captured graph
    _recorded: tuple | None = None  # the callback's tensors of a step being captured
    _times: TimeTable | None = None
    _tweedie: StepTable | None = None
    _rows: Tensor | None = None  # arange(N) on the device: an eager step's row is a view of it
    _seed_t: Tensor | None = None
    _formed: dict = field(default_factory=dict)  # per-run (a, b) tables of formed affine scores
    _msg_times: TimeTable | None = None  # the times step_done saw (for the error message of a device step)
    _time_in: tuple | None = None  # eager: (t tensor, its version, float64 [B], in x's dtype) of the last one

    # -- per-step tables ------------------------------------------------------------------
    def table(self, rows) -> StepTable:
        """Per-step values: rows [N, K] (a float64 tensor or N tuples), kept on the device when graphing."""
        rows = torch.as_tensor(rows, dtype=torch.float64)
        if rows.dim() == 1:
            rows = rows[:, None]
        return StepTable(rows, self.times.device, on_device=self.graph is not None)

    def time(self, n: Step) -> StepTime:
        """Grid time t_n (``StepTime``: ``ctx.score`` reads it from a device table at the step counter)."""
        if self._times is None:
            self._times = TimeTable(self.times, self.times.device)
        return self._times.at(n)

    def time_table(self, times: Tensor) -> TimeTable:
        """Per-step times [N] (float64) other than the grid's (heun's churned and next times)."""
        return TimeTable(torch.as_tensor(times, dtype=torch.float64), self.times.device)

    def row(self, n: Step) -> Tensor:
        """Step n as the 0-d int64 device tensor the table kernels read: the device counter itself, or
        for an int n a view of a per-run arange (no op, no host-to-device copy)."""
        if isinstance(n, Tensor):
            return n
        if self._rows is None:
            self._rows = torch.arange(len(self.times), device=self.times.device)
        return self._rows[n] if n < len(self._rows) else torch.tensor(n, device=self.times.device)

    # -- score evaluations ----------------------------------------------------------------
    def score(self, x: Tensor, t: Tensor | float, *, t_in: Tensor | None = None) -> Tensor:
        """score_fn(x, t [B] in the SDE's time, **extra_args); counts NFE, flags NaN/inf.

        ``t_in``: t already in x's dtype [B] (what the network is given), when the caller made it
        for several calls at once (rk45's stage times).  The score comes back in x's dtype, except
        that a bf16/fp16 score of an fp32 state is kept as it is: every fused op reads it directly
        and does its arithmetic in fp32."""
        if t_in is not None:
            return self._network(self.score_fn, x, t_in)
        if isinstance(t, StepTime) and self._affine(x):
            return self._affine_score(x, t)
        if isinstance(t, StepTime):  # a table's time at the step counter: one index_select, in x's dtype
            index = self.row(t.n).reshape(1).expand(x.shape[0])
            t_in = torch.index_select(t.table.net(x.dtype), 0, index)
        elif isinstance(t, float):  # an eager time: made in x's dtype at once (one rounding)
            t_in = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        elif self._reuse_time(t, x):
            t, t_in = self._time_in[2:]  # the same, unmodified time tensor as the last call (Langevin's t)
        else:
            source = t
            t = as_time(t, x)
            t_in = t.to(x.dtype)
            if self.graph is None and isinstance(source, Tensor):  # a replay may rewrite a buffer unseen
                self._time_in = (source, source._version, t, t_in)
        return self._network(self.score_fn, x, t_in)

    def _network(self, fn: Callable, x: Tensor, t_in: Tensor) -> Tensor:
        """fn(x, t_in, **extra_args) under the run's autocast, checked, counted; in x's dtype, except
        that a bf16/fp16 output beside an fp32 state is kept as it is: every fused op reads it
        directly and does its arithmetic in fp32."""
        if self.autocast_dtype is not None:
            # no cast cache under graphs: cached weight casts must not live in a capture's pool
            with torch.autocast(x.device.type, dtype=self.autocast_dtype, cache_enabled=self.graph is None):
                s = fn(x, t_in, **self.extra_args)
        else:
            s = fn(x, t_in, **self.extra_args)
        if type(s) is not Tensor or s.shape != x.shape or s.device != x.device or s.dtype not in _SCORE_DTYPES:
            _check_score(s, x)  # one cheap check per call; names the problem (a Tensor subclass passes)
        self.nfe += 1
        if s.dtype in (torch.bfloat16, torch.float16) and x.dtype == torch.float32:
            return s
        return s.to(x.dtype) if s.dtype != x.dtype else s

    def _affine(self, x: Tensor) -> bool:
        """score_fn is an adapter with an affine form the samplers can fold (not float64 states: the
        reference path keeps the adapter's own arithmetic).  A wrapper around an adapter (guidance)
        is not one, even if it copied the adapter's attributes: it is called as it is."""
        return x.dtype != torch.float64 and getattr(self.score_fn, "affine_of", None) is self.score_fn

    def _affine_score(self, x: Tensor, t: StepTime) -> AffineScore:
        """The network at step n's time (its time input from a per-run table: one index_select), and
        the per-run a, b of the adapter's affine form; nothing else runs on the device."""
        fn, table, dtype = self.score_fn, t.table, x.dtype
        net_t = table.mapped(("net", dtype), lambda r: fn.net_time(r).to(dtype).to(x.device), dtype)
        a, b, uses_x = table.mapped(("affine", dtype), lambda r: _affine_coefs(fn, r), dtype)
        t_in = torch.index_select(net_t, 0, self.row(t.n).reshape(1).expand(x.shape[0]))
        out = self._network(fn.net, x, t_in)
        return AffineScore(out, x, a, b, uses_x, t.n, (id(table), dtype))

    def formed(self, s) -> Tensor:
        """The score as a tensor: an ``AffineScore`` formed by one fused launch (a x + b out)."""
        if not isinstance(s, AffineScore):
            return s
        table = self._formed.get(s.key)
        if table is None:
            table = self._formed[s.key] = StepTable(torch.stack([s.a, s.b], 1), self.times.device, on_device=True)
        return self.update_row(s.x, table, s.n, [s.out], cols=(0, 1, 0.0), noise=False)

    def _reuse_time(self, t, x: Tensor) -> bool:
        """t is the eager call's last time tensor, unchanged since (same object and version)."""
        last = self._time_in
        return last is not None and last[0] is t and last[1] == t._version and last[3].dtype == x.dtype

    def denoised(self, x: Tensor, n: Step, score: Tensor) -> Tensor:
        """Tweedie at grid time t_n: x0 = (x + std^2 s) / mean_coef, one fused pass."""
        if self._tweedie is None:
            times = self.times.to("cpu", torch.float64)
            a, s = self.sde.mean_coef(times), self.sde.std(times)
            self._tweedie = self.table(torch.stack([1.0 / a, s * s / a], 1))
        return self.update_row(x, self._tweedie, n, [score], cols=(0, 1, 0.0), noise=False)

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
        self._check_draw(j)
        return n if (self.draws, j) == (1, 0) else n * self.draws + j  # (no tensor op for S = 1)

    def _check_draw(self, j: int) -> None:
        if not 0 <= j < self.draws:
            raise AssertionError(f"draw {j} outside the {self.draws} declared draws")

    def update(self, x: Tensor, terms, *, noise=0.0, n: Step = 0, j: int = 0, x_coef=1.0) -> Tensor:
        """fused_update on stream 0 with step n*S + j (arguments were validated once per run)."""
        return apply(
            x,
            [(c, self.formed(t)) for c, t in terms],
            noise=noise,
            x_coef=x_coef,
            seed=self.seed_tensor(),
            step=self.counter(n, j),
            stream=STREAM_SAMPLER,
            sample_ids=self.sample_ids,
            out=None,
            backend=self.backend_name(x),
            trusted=True,
        )

    def update_row(
        self, x: Tensor, table: StepTable, n: Step, terms, *, cols: tuple | None = None, j: int = 0, noise: bool = True
    ) -> Tensor:
        """The one-launch update of step n: ``c0 x + sum c_{1+i} terms[i] + c_last z`` with c the row n of
        ``table``'s columns ``cols`` (default: all, laid out x, terms..., noise), read by the fused
        kernel at the step counter; Philox step n*S + j; the kernel sets the non-finite flag.
        ``noise=False`` draws nothing (the noise column is not read)."""
        self._check_draw(j)
        terms = list(terms)
        cols = tuple(range(len(terms) + 2)) if cols is None else cols
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *terms) if isinstance(t, Tensor)):
            return self._update_with_grad(x, table, n, terms, cols, j, noise)
        wanted = torch.float64 if x.dtype == torch.float64 else torch.float32
        if any(isinstance(t, AffineScore) for t in terms):
            tensors, coefs = _fold(x, terms, cols)
            if len(tensors) - 1 > MAX_TERMS:  # no room to fold: form the scores first
                return self.update_row(x, table, n, [self.formed(t) for t in terms], cols=cols, j=j, noise=noise)
            x, terms = tensors[0], tensors[1:]
            packed = table.folded(coefs, wanted)
        else:
            packed = table.packed(cols, wanted)
        _common.check_terms([(None, t) for t in terms], x)  # a kernel must never read foreign memory
        return fused_update_table(
            x,
            terms,
            packed,
            self.row(n),
            seed=self.seed_tensor(),
            draws=self.draws,
            draw=j,
            with_noise=noise,
            stream=STREAM_SAMPLER,
            sample_ids=self.sample_ids,
            flag=self.flag(x.device),
            backend=self.backend_name(x),
            _trusted=True,
        )

    def _update_with_grad(self, x, table: StepTable, n: Step, terms, cols, j: int, noise: bool) -> Tensor:
        """A score that records gradients: the differentiable ``fused_update`` with the row's coefficients
        (the table op records none); the flag is then not set, the run's last check still sees the samples."""
        row = table[n]
        c = [row[k] if isinstance(k, int) else k for k in cols]
        terms = [(cf, self.formed(t)) for cf, t in zip(c[1:-1], terms, strict=True)]
        return self.update(x, terms, x_coef=c[0], noise=c[-1] if noise else 0.0, n=n, j=j)

    def seed_tensor(self) -> Tensor:
        """The seed as a 0-d int64 tensor, made once per run (a trace then records no constant op).
        A tensor seed (a cached graph's static input, ``scorefast.graphs``) is returned itself, so a
        tensor made from an earlier int seed is never read after the seed changed."""
        if isinstance(self.seed, Tensor):
            return self.seed
        if self._seed_t is None:
            self._seed_t = _checks.counter_tensor(self.seed)
        return self._seed_t

    def flag(self, device: torch.device) -> Tensor:
        """The run's non-finite flag (0-d int64, -1 until a kernel writes a non-finite value at step n)."""
        self._device_flags(device)
        return self._first_bad

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
        which a check of the score alone misses.  The check is the fused kernels' own: every update of
        the step sets the run's flag (``flag``) when it writes a non-finite value, so a step adds no
        reduction of its own.
        """
        if self.project is not None:
            x = self.project(self, x, n, t)
        if isinstance(n, Tensor):  # a device step (graphs): the host side runs after each replay
            if isinstance(t, StepTime):
                self._msg_times = t.table
                t = t.value(x) if self.callback is not None else None
            self._recorded = (x, t, denoised)
            return x
        self._step_times[n] = t
        self._step = n + 1
        self.report(n, x, t, denoised)
        if not _checks.is_capturing_or_compiling() and (n + 1) % CHECK_EVERY == 0:
            self.check_finite()
        return x

    def report(self, n: int, x: Tensor, t, denoised: Tensor | None) -> None:
        """The host side of step n: callback and progress bar."""
        if self.callback is not None:
            t = t.value(x) if isinstance(t, StepTime) else as_time(t, x)
            self.callback({"x": x, "i": n, "t": t, "sigma": t, "denoised": denoised})
        if self._progress is not None:
            self._progress.update(1)

    def finish(self, x: Tensor) -> None:
        """After the run: the samples themselves are finite too (a last update that no kernel flagged,
        such as an adaptive solver's), then the flags are read (one host sync)."""
        self._final = _finite_witness(x)
        self.check_finite()

    def _device_flags(self, device: torch.device) -> None:
        """The device-side first-bad-step flag and its time (graphs), made once per run."""
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.int64, device=device)
            self._bad_time = torch.zeros((), dtype=torch.float64, device=device)

    def check_finite(self) -> None:
        """Read the non-finite flag (one host sync) and raise NonFiniteError naming the first bad step."""
        bad = None
        if self._first_bad is not None and int(self._first_bad) >= 0:
            bad = int(self._first_bad)
        elif self._final is not None and not bool(torch.isfinite(self._final)):
            bad = len(self.times) - 1
        if bad is None:
            self._step_times.clear()
            return
        raise NonFiniteError(
            f"non-finite samples at step {bad} (t = {self._message_time(bad):.6g}): score_fn returned NaN/inf "
            "there, or a finite score too large for the state's dtype overflowed the update"
        )

    def _message_time(self, n: int) -> float:
        """The time step n was taken from, as its step_done saw it (grid time for a replayed step)."""
        t = self._step_times.get(n)
        if t is None:
            table = self._msg_times if self._msg_times is not None else TimeTable(self.times, self.times.device)
            return table.host[min(n, len(table.host) - 1)]
        if isinstance(t, StepTime):
            return t.host()
        return float(t.reshape(-1)[0]) if isinstance(t, Tensor) else float(t)

    def t_vec(self, t: float | Tensor, x: Tensor) -> Tensor:
        return as_time(t, x)
