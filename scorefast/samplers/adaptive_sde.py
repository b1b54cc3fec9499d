"""Adaptive Euler–Maruyama with an improved-Euler error estimate (Jolicoeur-Martineau et al. 2021,
"Gotta Go Fast When Generating Data with Score-Based Models", Algorithm 1), then the Tweedie step.

Each attempt of each sample, from its own time t with its own step h (reverse time, t -> t - h), one
normal draw z (stream 0, Philox step k = n for attempt n: S = 1, both stages reuse it):

    x'  = x + h F(x, t) + g(t) sqrt(h) z                         Euler–Maruyama
    x'' = x + h/2 (F(x, t) + F(x', t - h)) + (g(t) + g(t - h))/2 sqrt(h) z     improved Euler
    E   = || (x'' - x') / max(atol, rtol max(|x'|, |x'_prev|)) ||_2 / sqrt(D)   their mixed norm

with F = -(f - g^2 s) the reverse drift per unit of reverse time.  E <= 1 accepts x'' (the
extrapolation: the higher-order solution is kept) and remembers x' as x'_prev; either way the next
step is min(t - t_end, safety h E^-exponent).  A step combination is one fused pass (the reverse
drift is a x + b s; the kernel regenerates z from its counter for the second pass); an adapter's
affine form s = a' x + b' out folds into the attempt's table (``sde_coefs``), so the network's own
output is what the passes read.  Per-sample
times, steps and NFE (2 per attempt) as rk45, through ``Context.steps`` (a captured graph replays
one attempt); the error norm goes through ``sf.ops.sample_sumsq`` (batch-invariant), or is one norm
over the batch with ``error_norm="batch"``.  ``steps`` is ignored: the run goes from the grid's first
time to its last (T -> eps by default), then ``denoise`` takes the Tweedie step (one more NFE).
A NaN/inf ends the run with ``NonFiniteError`` at the first bad attempt.

Faithful to the authors' code (AlexiaJM/score_sde_fast_sampling, ``sde_sampling_torch.py``): the
test suite runs their loop transcribed in float64 on the same draws and gets the same attempts per
sample.  Defaults are theirs: rtol = atol = 1e-2 (their CIFAR-10 runs: eps_rel 0.01-0.1 with eps_abs
0.0078 on [-1, 1] pixels), h_init = 0.01, safety 0.9, exponent 0.9, the L2 norm scaled by sqrt(D).

The authors' loop draws new noise after a rejection (``brownian="redraw"``, the default).  Since the
error estimate contains the noise, the accept/reject test then selects the draws a run keeps, which
biases the law, and tightening the tolerance does not remove it: a 2-D Gaussian under VE comes out
with 1.2x / 1.75x / 2.3x its variance at rtol = atol = 0.3 / 0.05 / 0.01, a 16-D one with 1.03x /
1.10x at 0.05 / 0.01, a 64-D one with ~1.01x (the authors' images have thousands of dimensions).
``brownian="bridge"`` keeps every draw instead (rejection sampling with memory,
Rackauckas & Nie 2017; ``scorefast.solvers.brownian_memory``): a rejected increment is split at the
retry's step by the Brownian bridge and its rest is taken by later attempts, so the law converges as
the tolerance tightens (that 2-D Gaussian: 0.86x / 0.96x / 0.97x), for 10-50% more attempts at a
tolerance and a second draw per attempt (S = 2: stream 0, Philox steps 2n and 2n + 1).

What the quality suite found (random mixtures in 16-D and 64-D under VP and VE, sliced W1 within
1.1x of the Monte-Carlo floor, NFE = the batch's largest per-sample NFE, 3 seeds): there it needs
rtol = atol 0.2-0.7, not 1e-2 (375 NFE on VP, 841 on VE in 64-D: 6-15x, for nothing the metric sees), then
~57 NFE in 64-D and 55-71 in 16-D.  That beats ``pc`` (50-100) but not ``euler_maruyama`` on its
default grid (14-20 in 16-D, 30-50 in 64-D): each attempt costs 2 NFE and, the error estimate
containing the noise, 30-40% of attempts are rejected, so an accepted step costs ~3 NFE against the
fixed grid's 1, which the step-size adaptation does not win back on these targets.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .. import _checks
from ..ops.noise import noise_op
from ..ops.scaled_sumsq import scaled_sumsq
from ..ops.sde_coefs import sde_coefs
from ..rng import KINDS, STREAM_SAMPLER
from ..solvers import adaptive, brownian_memory
from .base import Context, affine_coefs_at
from .ode_euler import tweedie

NAME = "adaptive_sde"
BROWNIAN = ("redraw", "bridge")
NORMAL = KINDS["normal"]


def draws(brownian: str = "redraw", **_) -> int:
    """S: one draw per attempt; "bridge" also draws the bridge point of a rejected increment."""
    return 2 if brownian == "bridge" else 1


DRAWS = draws

DEFAULT_STEPS = 2
KIND = "ode"  # integrates between the grid's first and last times and ends with a Tweedie step


def validate(
    sde, *, rtol, atol, h_init, safety, exponent, error_norm, max_steps, denoise, brownian, bridge_depth
) -> dict:
    """Every option checked and normalised before any work (``sf.sample`` calls this; ``run`` trusts it)."""
    rtol, atol, max_steps = adaptive.check_options(rtol, atol, max_steps, error_norm)
    h_init = _checks.check_finite_scalar("h_init", h_init, positive=True)
    safety = _checks.check_finite_scalar("safety", safety, positive=True)
    exponent = _checks.check_finite_scalar("exponent", exponent, positive=True)
    if h_init > 1 or safety > 1:
        raise ValueError(f"h_init, safety: must lie in (0, 1], got {h_init}, {safety}")
    return {
        "rtol": rtol,
        "atol": atol,
        "h_init": h_init,
        "safety": safety,
        "exponent": exponent,
        "error_norm": error_norm,
        "max_steps": max_steps,
        "denoise": _checks.check_bool("denoise", denoise),
        "brownian": _checks.check_choice("brownian", brownian, BROWNIAN),
        "bridge_depth": _checks.check_int("bridge_depth", bridge_depth, minimum=2),
    }


def run(
    ctx: Context,
    x,
    *,
    rtol: float = 1e-2,
    atol: float = 1e-2,
    h_init: float = 1e-2,
    safety: float = 0.9,
    exponent: float = 0.9,
    error_norm: str = "sample",
    max_steps: int = 100_000,
    denoise: bool = True,
    brownian: str = "redraw",
    bridge_depth: int = brownian_memory.DEFAULT_DEPTH,
):
    """Options: ``rtol``, ``atol`` (the paper's eps_rel, eps_abs), ``h_init`` (first step as a fraction
    of the time span), ``safety`` (theta) and ``exponent`` (r) of the step rule, ``error_norm``,
    ``max_steps`` (attempts before ``SolverError``), ``denoise``; ``brownian``: ``"redraw"`` (the
    authors' loop: a rejected attempt's noise is thrown away) or ``"bridge"`` (rejection sampling with
    memory, ``scorefast.solvers.brownian_memory``: the law converges as the tolerance tightens) with
    at most ``bridge_depth`` kept intervals per sample."""
    if ctx.project is not None:  # inpainting and the like re-project after every grid step
        raise ValueError(f"sampler: {NAME!r} has no per-step state to condition; use a step-based sampler")
    sde = ctx.sde
    B, dev = x.shape[0], x.device
    t_end = float(ctx.times[-1])
    span = float(ctx.times[0]) - t_end
    numel = x[0].numel()
    fused = adaptive.FusedRows(x.reshape(B, -1), ctx.backend)
    backend, dt = fused.name, _checks.state_dtype(x)
    fn, folded = ctx.score_fn, ctx._affine(x)  # an adapter's affine form is folded into the table
    # per-sample control in one op per attempt (``sf.ops.step_control``, rule "sde"): accept, counts,
    # h = safety h E^-exponent, the failure record, and the next attempt's times t and t - h
    control = adaptive.Controller(
        torch.full((B,), t_end, dtype=torch.float64, device=dev),
        torch.zeros(B, dtype=torch.float64, device=dev),
        torch.tensor([0.0, -1.0], dtype=torch.float64, device=dev),
        None, numel=numel, error_norm=error_norm, backend=backend, rule="sde", safety=safety, exponent=exponent,
    )  # fmt: skip

    bridge = brownian == "bridge"
    no_noise = torch.zeros(1, B, dtype=dt, device=dev) if bridge else None

    def normals(n, j) -> Tensor:
        """Draw j of attempt n: standard normals [B, D], stream 0, Philox step 2n + j (the op itself: its
        arguments are the run's, checked once; a recorded attempt replays it)."""
        step = _checks.counter_tensor(ctx.counter(n, j))
        return noise_op(ctx.sample_ids, ctx.seed_tensor(), step, numel, STREAM_SAMPLER, 0, NORMAL, x.dtype, backend)

    def noise_for(n, state, times, memory):
        """With "bridge": this attempt's step and standard-normal noise [B, D] (a kept interval of the
        sample's Brownian path, else the controller's step and a fresh draw, stream 0, step 2n)."""
        fresh = normals(n, 0)
        h, z = brownian_memory.take(state[adaptive.H], state[adaptive.R], fresh, *memory[:3])
        control.set_step(state, times, h)
        return h, z

    def attempt(n, x, x_prev, state, times, table, *memory):
        """One attempt for every sample; ``state`` (r, h, counts, ...; a done sample has r = 0 and a zero
        step) and ``times`` [2, B] (t, t - h) are the controller's, updated in place.  Both updates'
        coefficients are made at once: one table [10, B] (x, terms, noise of each; the times last).
        ``memory``: the kept intervals with ``brownian="bridge"`` (``brownian_memory``)."""
        if bridge:
            active = state[adaptive.ACTIVE] != 0
            h_now, z = noise_for(n, state, times, memory)
        # reverse drift f - g^2 s = a x + b s, g = sqrt(-b); a user SDE's own dtype or layout is made
        # the kernels' contiguous float64 here (no op for the built-in SDEs).  An adapter (score = a' x
        # + b' out) folds in: (a + b a') x + (b b') out at both times, the network on its own time
        # input, so its output is read once, by the fused passes
        a, b = (v.to(torch.float64).contiguous() for v in sde.reverse_coefs(times))
        h = state[adaptive.H]
        if folded:
            fa, fb = affine_coefs_at(fn, times)
            coefs = sde_coefs(h, times, a, b, fa, fb, dtype=dt, backend=backend, trusted=True)
            t_in, net = fn.net_time(times).to(x.dtype), fn.net
        else:
            coefs = sde_coefs(h, times, a, b, dtype=dt, backend=backend, trusted=True)
            t_in, net = (coefs[8:] if x.dtype == dt else times.to(x.dtype)), fn
        x2d, seed, ids = x.view(B, -1), ctx.seed_tensor(), ctx.sample_ids  # a cached graph's static inputs
        s1 = ctx._network(net, x, t_in[0])
        if bridge:  # the noise is a term of the passes, its coefficient the table's noise row
            x1 = fused(x2d, [s1.view(B, -1), z], torch.cat((coefs[0:3], no_noise))).view(x.shape)
        else:
            x1 = fused.noisy(x2d, [s1.view(B, -1)], coefs[0:3], seed, n, ids).view(x.shape)
        s2 = ctx._network(net, x1, t_in[1])
        terms = [s1.view(B, -1), x1.view(B, -1), s2.view(B, -1)]
        if bridge:
            x2 = fused(x2d, [*terms, z], torch.cat((coefs[3:8], no_noise)))
        else:
            x2 = fused.noisy(x2d, terms, coefs[3:8], seed, n, ids)
        x2 = x2.view(x.shape)
        rows = (v.view(B, -1) for v in (x2, x1, x_prev))
        err = scaled_sumsq(*rows, rtol=rtol, atol=atol, mode="sde", backend=backend, trusted=True)
        accept, (x, x_prev) = control.decide(n, state, err, times, table, [x2, x1], [x, x_prev])
        if bridge:
            brownian_memory.keep(active & ~accept, h_now, state[adaptive.H], z, normals(n, 1), *memory)
        return x, x_prev, state, times, table, *memory

    def done(carry) -> bool:  # one host read
        return not adaptive.running(carry[2][adaptive.R], carry[2][adaptive.FAIL])

    r = torch.full((B,), span, dtype=torch.float64, device=dev)
    carry = (x, x.contiguous(), *control.start(r, r * h_init))
    if bridge:
        carry = (*carry, *brownian_memory.start(B, numel, bridge_depth, x.dtype, dev))
    x, _, state, *rest = ctx.steps(attempt, carry, 0, max_steps, done=done)
    r, h, fail = state[adaptive.R], state[adaptive.H], state[adaptive.FAIL]
    steps, rejected = state[adaptive.STEPS].long(), state[adaptive.REJECTED].long()
    t = r + t_end
    adaptive.raise_failure(fail, NAME, t, ids=ctx.sample_ids)
    adaptive.raise_max_steps(NAME, r > 0, t, h, t_end, max_steps)
    if bridge and int(rest[-1]):
        warnings.warn(
            f"bridge_depth: {int(rest[-1])} rejected attempts found the {bridge_depth} kept intervals of their "
            "sample full, dropped them and redrew their noise (the authors' rule); raise bridge_depth",
            RuntimeWarning,
            stacklevel=3,
        )
    ctx.per_sample_nfe = 2 * (steps + rejected) + (1 if denoise else 0)
    ctx.step_done(0, x, ctx.t_vec(t_end, x))
    return tweedie(ctx, x, denoise)
