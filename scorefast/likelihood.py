"""Log-likelihood by the probability-flow ODE (Song et al. 2021, score_sde's likelihood.py).

log p_eps(x) = log p_T(x_T) + int_eps^T div f~(x_t, t) dt with f~ = a(t) x + b(t) s(x, t) the
probability-flow drift (``sde.reverse_coefs``), solved from eps to T with the shared Dormand–Prince
solver (``scorefast.solvers``).  Since the drift is affine in the score, div f~ = a D + b div s:
only the network is differentiated, and the a D part is exact.  The divergence is a float64
quadrature beside the state, so it never feeds back into the stages, and it is computed only where
the solver uses it: Dormand–Prince's second stage has weight zero in both the solution and the error
estimate, so there the network's backward pass is skipped (one fewer per attempt of six
evaluations; scipy's loop, as score_sde's, computes it at every evaluation).  A divergence that
would have been NaN/inf at that stage alone is never computed, so it cannot fail the solve.

Precision: the network runs in its own dtype (its parameters' dtype where ``score_fn`` exposes the
module, else x's dtype, or ``network_dtype``); the state x_t is float32 (each stage combination
one fused pass) unless x is float64 (then float64, on the reference backend); time, the
log-density change and the per-sample dot products are float64.  Hutchinson probes (stream 1,
k = the caller's ``step``, fp32 from the fast generator) are drawn once per solve and held fixed;
the exact divergence takes D VJPs per evaluation (small D).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from . import _checks
from .divergence import PROBES, check_fn_output, check_n_probes, diagonal_trace, per_sample_dot, probes, vjp, vjp_trace
from .errors import NonFiniteError
from .rng import STREAM_DEQUANT, rand
from .sde.base import SDE
from .solvers import adaptive, solve

DIVERGENCES = ("hutchinson", "exact")


def infer_network_dtype(score_fn: Callable, x: Tensor) -> torch.dtype:
    """The dtype a network runs in: its first floating parameter's (``score_fn`` itself or the
    ``score_fn.net`` the adapters and ``sf.models.load`` attach, when a ``torch.nn.Module``),
    else x's dtype."""
    for obj in (score_fn, getattr(score_fn, "net", None)):
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                if p.is_floating_point():
                    return p.dtype
    return x.dtype


def _check_data_range(data_range) -> tuple[float, float]:
    if not (isinstance(data_range, tuple | list) and len(data_range) == 2):
        raise TypeError(f"data_range: expected a pair (lo, hi), got {data_range!r}")
    lo = _checks.check_finite_scalar("data_range", data_range[0])
    hi = _checks.check_finite_scalar("data_range", data_range[1])
    if not hi > lo:
        raise ValueError(f"data_range: need lo < hi, got {tuple(data_range)}")
    return lo, hi


def log_likelihood(
    score_fn: Callable,
    sde: SDE,
    x: Tensor,
    *,
    eps: float = 1e-5,
    divergence: str = "hutchinson",
    n_probes: int = 1,
    probe: str = "rademacher",
    solver: str = "rk45",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    seed=0,
    step=0,
    sample_ids: Tensor | None = None,
    prior_logp: Callable | None = None,
    data_range: tuple[float, float] | None = None,
    return_nfe: bool = False,
    error_norm: str = "sample",
    max_steps: int = 100_000,
    network_dtype: torch.dtype | None = None,
    backend: str | None = None,
    extra_args: dict | None = None,
    retire: bool = True,
):
    """Negative log-likelihood per sample of x [B, ...] under the model's p_eps.

    Args:
        divergence: "exact" (D VJPs per evaluation) or "hutchinson" (n_probes fixed probes).
        prior_logp: log p_T(z) -> [B]; default ``sde.prior_logp`` (pass the exact p_T in tests:
            VP's N(0, I) prior is off by 0.01-0.03 nats/dim on simple data).  z is float64.
        data_range: (lo, hi) of 8-bit data: add uniform dequantisation noise of one 256th of the
            range (stream 6, k = step) and report bits/dim of the discrete data, as score_sde's offset.
        error_norm: "sample" (each sample's own error control: batch-invariant) or "batch" (one RMS
            over the batch, as score_sde's scipy solver; fewer evaluations for the hardest sample).
        extra_args: keyword arguments of score_fn (``score_fn(x, t, **extra_args)``, as ``sf.sample``);
            a tensor [B, ...] is per sample (class labels, conditioning) and follows its samples.
        retire: with ``error_norm="sample"``, samples that reached T leave the batch, so score_fn runs
            on the unfinished ones only (a smaller batch; same per-sample results, fewer evaluations).
            A score_fn that closes over per-sample state of its own (rather than ``extra_args``)
            needs the whole batch on every call: pass ``retire=False``.
        max_steps: solver attempts before ``scorefast.solvers.SolverError``.
        network_dtype: the dtype the network is called in (default: ``infer_network_dtype``).
    Returns (nll [B] nats, bpd [B]) (float64), and the per-sample NFE if ``return_nfe``.
    Raises ``NonFiniteError`` for NaN/inf in x or in the score (at the first bad solver attempt).
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn: must be callable as score_fn(x, t) -> score, got {type(score_fn).__name__}")
    if not isinstance(sde, SDE):
        raise TypeError(f"sde: expected a scorefast.sde SDE, got {type(sde).__name__}")
    _checks.check_float_tensor("x", x)
    B = _checks.check_batched("x", x)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence: expected 'exact' or 'hutchinson' inside the ODE, got {divergence!r}")
    n_probes = check_n_probes(n_probes)
    if probe not in PROBES:
        raise ValueError(f"probe: expected one of {PROBES}, got {probe!r}")
    if solver != "rk45":
        raise ValueError(f"solver: only 'rk45' is available, got {solver!r}")
    rtol, atol, max_steps = adaptive.check_options(rtol, atol, max_steps, error_norm)
    eps = _checks.check_finite_scalar("eps", eps, positive=True)
    if not eps < sde.T:
        raise ValueError(f"eps: must be below T={sde.T}, got {eps}")
    _checks.check_counter("seed", seed, x.device, upper=_checks.UINT64)
    _checks.check_counter("step", step, x.device, upper=_checks.UINT32)
    ids = _checks.check_sample_ids(sample_ids, B, x.device)
    if prior_logp is not None and not callable(prior_logp):
        raise TypeError(f"prior_logp: must be callable as prior_logp(z) -> [B], got {type(prior_logp).__name__}")
    lo_hi = _check_data_range(data_range) if data_range is not None else None
    if network_dtype is not None and network_dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"network_dtype: expected a floating dtype, got {network_dtype!r}")
    if not isinstance(return_nfe, bool | numbers.Integral):
        raise TypeError(f"return_nfe: expected a bool, got {type(return_nfe).__name__}")
    extra = _checks.check_extra_args(extra_args, B)
    retire = _checks.check_bool("retire", retire)
    net_dtype = network_dtype or infer_network_dtype(score_fn, x)
    if B == 0:
        empty = x.new_zeros(0, dtype=torch.float64)
        return (empty, empty, empty.long()) if return_nfe else (empty, empty)
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError("x: contains NaN or inf")

    D = x[0].numel()
    state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y0 = x.detach().to(torch.float64)
    offset = 0.0
    if lo_hi is not None:
        lo, hi = lo_hi
        u = rand(x.shape, seed=seed, step=step, stream=STREAM_DEQUANT, sample_ids=ids, device=x.device)
        y0 = y0 + u.double() * (hi - lo) / 256
        offset = math.log2(256 / (hi - lo))
    y0 = y0.to(state_dtype)
    v = probes(y0, n_probes, probe=probe, seed=seed, step=step, sample_ids=ids) if divergence == "hutchinson" else None
    time_dtype = torch.float64 if net_dtype == torch.float64 else torch.float32
    fused_dtype = torch.float64 if y0.dtype == torch.float64 else torch.float32
    fused = adaptive.FusedRows(y0, backend)
    # per-sample rows ride with their samples (batch-first; finished samples retire from the solve):
    # the probes in fp32 and float64, then the per-sample tensors of extra_args
    # (one probe, the default: [B, ...] rows, so each evaluation's trace is one VJP and one dot)
    if v is None:
        probe_rows = ()
    elif n_probes == 1:
        probe_rows = (v[0], v[0].double())
    else:
        probe_rows = (v.transpose(0, 1), v.double().transpose(0, 1))
    row_keys = [k for k, val in extra.items() if isinstance(val, Tensor) and val.dim() > 0]
    fixed = {k: val for k, val in extra.items() if k not in row_keys}
    n_probe_rows = len(probe_rows)

    def schedule(t: Tensor) -> tuple[Tensor, ...]:
        """Per stage time t [S, B], once per solver attempt: the time the network sees, the drift's
        coefficient matrices [S, 3, B] (a, b, no noise) in the kernels' dtype, and b and a D (float64)
        for the divergence a D + b div s."""
        a, b = sde.reverse_coefs(t, probability_flow=True)
        coefs = torch.stack([a, b, torch.zeros_like(a)], 1).to(fused_dtype)
        return t.to(time_dtype), coefs, b, a * D

    def rhs(y: Tensor, _t: Tensor, t_net, coefs, b: Tensor, a_dim: Tensor, *rows, quadrature: bool = True):
        """(probability-flow drift a y + b s in the state's dtype, its divergence [b, 1] float64) for
        the b samples still integrating; ``rows``: their probes ([b, ...] for one probe, else
        [b, n, ...]; fp32, float64) and per-sample extra_args.  ``quadrature=False`` (a stage whose
        divergence the solver never uses): the drift only, and no backward pass.  The network is
        called the same way at every stage (grad enabled, an input that requires grad), so a score
        that differentiates its own input, or a compiled network's guards, see no difference."""
        probe_rows, kwargs = rows[:n_probe_rows], fixed
        if row_keys:
            kwargs = {**fixed, **dict(zip(row_keys, rows[n_probe_rows:]))}
        n = y.shape[0]
        with torch.enable_grad():
            xin = y.detach().to(net_dtype).requires_grad_(True)
            s = check_fn_output("score_fn", score_fn(xin, t_net, **kwargs), xin)
            if not quadrature:
                trace = None
            elif n_probes == 1 and probe_rows:
                trace = per_sample_dot(probe_rows[1], vjp(s, xin, probe_rows[0], False), lead=1)
            elif probe_rows:
                trace = vjp_trace(s, xin, probe_rows[0].transpose(0, 1), probe_rows[1].transpose(0, 1))
            else:
                trace = diagonal_trace(s, xin)
        drift = fused(y.reshape(n, -1), [s.detach().reshape(n, -1)], coefs).view(y.shape)
        return drift, None if trace is None else torch.addcmul(a_dim, b, trace)[:, None]

    def prior(z: Tensor) -> Tensor:
        z = z.to(torch.float64)
        out = prior_logp(z) if prior_logp is not None else sde.prior_logp(z)
        if not isinstance(out, Tensor) or out.shape != (B,) or not out.is_floating_point():
            got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"prior_logp: returned {got}, expected one float log-density per sample, shape ({B},)")
        return out.to(torch.float64)

    prior(y0)  # a wrongly shaped prior fails now, not after the solve
    q0 = torch.zeros(B, 1, dtype=torch.float64, device=x.device)
    sol = solve(
        rhs,
        y0,
        eps,
        sde.T,
        rtol=rtol,
        atol=atol,
        q0=q0,
        error_norm=error_norm,
        max_steps=max_steps,
        backend=backend,
        name="log_likelihood",
        sample_ids=ids,
        time_coefs=schedule,
        per_sample=(*probe_rows, *(extra[k] for k in row_keys)),
        retire=retire,
        skip_idle_quadrature=True,
    )
    logp = prior(sol.y) + sol.q[:, 0]
    nll = -logp
    bpd = nll / (D * math.log(2)) + offset
    return (nll, bpd, sol.nfe) if return_nfe else (nll, bpd)
