"""What every scheduler here shares: one fused linear combination, the step's noise, float coefficients.

A diffusers ``step`` is, arithmetically, ``prev = a*x + sum_j c_j*t_j + s*z`` with scalars a, c_j, s
taken from the scheduler's own tables.  The schedulers compute those scalars as Python floats
(float64, from diffusers' float32 tables) and hand the tensors to ``lincomb``: one
``sf.ops.fused_update`` pass per four terms, z made inside the kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ... import rng
from ...rng import philox_seed
from .._fused import FusedUpdater

_fused = FusedUpdater()
_HALF = (torch.float16, torch.bfloat16)
MAX_TERMS = 4  # sf.ops.fused_update takes at most four terms a pass


def f64(v) -> float:
    """A table entry (0-d tensor, numpy or Python number) as a Python float."""
    return float(v.item() if isinstance(v, Tensor) else v)


_TABLES: dict[int, tuple[Tensor, int, list[float]]] = {}


def at(table: Tensor, index) -> float:
    """``table[index]`` as a Python float, from a list cached per table tensor (and its version), so a step
    reads its scalars without tensor indexing (nor a device sync per step for tables on a GPU)."""
    if isinstance(index, Tensor) and index.is_floating_point():
        return f64(table[index])  # diffusers' own indexing error
    hit = _TABLES.get(id(table))
    if hit is None or hit[0] is not table or hit[1] != table._version:
        if len(_TABLES) > 256:
            _TABLES.clear()
        hit = _TABLES[id(table)] = (table, table._version, table.tolist())
    return hit[2][int(index)]


def div(a: float, b: float) -> float:
    """a / b with IEEE semantics (inf or NaN for b = 0, as diffusers' tensor arithmetic), never an exception."""
    if b == 0:
        return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a) * math.copysign(1.0, b)
    return a / b


def sqrt(v: float) -> float:
    """sqrt(v), NaN for v < 0 (as torch's), never an exception."""
    return math.sqrt(v) if v >= 0 else math.nan


def promote(*dtypes: torch.dtype) -> torch.dtype:
    """torch's type promotion of tensors of these dtypes (what diffusers' tensor arithmetic returns)."""
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _generators(generator, batch: int) -> list | None:
    """A list of ``batch`` generators (one per sample), or None where one generator (or none) serves all."""
    if not isinstance(generator, list | tuple) or len(generator) == 1:
        return None
    if len(generator) != batch:
        raise ValueError(f"generator: a list of {len(generator)} generators for a batch of {batch}")
    return list(generator)


def philox_noise(shape: Sequence[int], generator=None, device=None, dtype=torch.float32) -> Tensor:
    """The Gaussian noise these schedulers draw for ``shape`` = [B, ...] from ``generator``.

    One generator (or a list of one, or None for torch's default CPU generator): one 64-bit seed
    drawn from it, Philox stream 0, step 0, sample ids arange(B).  A list of B generators: sample b
    from its own seed (drawn from generator b, sample id 0), so image b's noise depends on generator b
    alone, as diffusers promises.  This is also what a patched ``randn_tensor`` must return for a
    stock diffusers scheduler to see the same noise as ours.
    """
    shape = tuple(shape)
    gens = _generators(generator, shape[0])
    if gens is None:
        return rng.randn(shape, seed=philox_seed(generator), device=device, dtype=dtype)
    rows = [rng.randn((1, *shape[1:]), seed=philox_seed(g), device=device, dtype=dtype) for g in gens]
    return torch.cat(rows)


class StepNoise:
    """The noise one ``step`` draws, decided (and the generators advanced) when it is made.

    ``variance_noise`` given: that tensor.  A list of B generators: ``philox_noise``'s per-sample
    draw, as a tensor.  Otherwise one seed, and z is made inside the fused kernel, never stored.
    """

    def __init__(self, like: Tensor, generator=None, variance_noise: Tensor | None = None):
        self.seed = 0
        self.tensor = variance_noise
        if variance_noise is None:
            if _generators(generator, like.shape[0]) is None:
                self.seed = philox_seed(generator)
            else:
                self.tensor = philox_noise(like.shape, generator, like.device)


def lincomb(
    x: Tensor,
    terms: Sequence[tuple[float, Tensor]],
    *,
    x_coef: float = 1.0,
    noise: tuple[float, StepNoise] | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``x_coef*x + sum(c*t) + s*z`` (noise = (s, StepNoise)) in fused passes, returned in ``dtype``.

    Arithmetic runs in float32 (float64 when an input is float64): half inputs are read as they are
    and rounded once, at the end.  Terms with a zero coefficient are skipped.  A coefficient that is
    not finite raises ValueError (diffusers would return NaN or inf samples).
    """
    terms = [(c, t) for c, t in terms if not (isinstance(c, float | int) and c == 0)]
    kw = {}
    if noise is not None and (isinstance(noise[0], Tensor) or noise[0] != 0):
        scale, source = noise
        if source.tensor is not None:
            terms.append((scale, source.tensor))
        else:
            kw = {"noise": scale, "seed": source.seed}
    wide = torch.float64 if any(t.dtype == torch.float64 for t in (x, *(t for _, t in terms))) else torch.float32
    if wide == torch.float64:
        terms = [(c, t.double()) for c, t in terms]
    if x.dtype != wide and not (x.dtype in _HALF and dtype == x.dtype and len(terms) <= MAX_TERMS):
        x = x.to(wide)
    while len(terms) > MAX_TERMS:
        x, terms, x_coef = _fused(x, terms[:MAX_TERMS], x_coef=x_coef), terms[MAX_TERMS:], 1.0
    out = _fused(x, terms, x_coef=x_coef, **kw)
    return out if dtype is None or out.dtype == dtype else out.to(dtype)


def merge_terms(terms):
    """Sum the coefficients of a tensor that appears in several terms, so that it is read once."""
    out: dict[int, list] = {}
    for c, t in terms:
        if id(t) in out:
            out[id(t)][0] += c
        else:
            out[id(t)] = [c, t]
    return [(c, t) for c, t in out.values()]


def need_steps(scheduler) -> None:
    """diffusers' error for a step before ``set_timesteps``."""
    if scheduler.num_inference_steps is None:
        raise ValueError(
            "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
        )


def multistep_order(scheduler, model_output, lower_order_final: bool, lower_order_second: bool) -> int:
    """diffusers' multistep bookkeeping (DPM-Solver, DEIS): push the converted output into ``model_outputs``
    and return this step's order (lower at the start, and at the end where asked)."""
    cfg = scheduler.config
    for j in range(cfg.solver_order - 1):
        scheduler.model_outputs[j] = scheduler.model_outputs[j + 1]
    scheduler.model_outputs[-1] = model_output
    if cfg.solver_order == 1 or scheduler.lower_order_nums < 1 or lower_order_final:
        return 1
    if cfg.solver_order == 2 or scheduler.lower_order_nums < 2 or lower_order_second:
        return 2
    return 3


def multistep_done(scheduler) -> None:
    """The end of a multistep ``step``: one more output of history, the next step index."""
    if scheduler.lower_order_nums < scheduler.config.solver_order:
        scheduler.lower_order_nums += 1
    scheduler._step_index += 1


def x0_coefs_vp(prediction_type: str, alpha: float, sigma: float, raw_sigma: float | None = None):
    """(p, q) with x0 = p*x + q*m for x = alpha*x0 + sigma*eps and model output m; None if unknown.

    ``flow_prediction`` (x = (1 - s) x0 + s eps, m = eps - x0) uses the table's own sigma s.
    """
    if prediction_type == "epsilon":
        return div(1.0, alpha), div(-sigma, alpha)
    if prediction_type == "sample":
        return 0.0, 1.0
    if prediction_type == "v_prediction":
        return alpha, -sigma
    if prediction_type == "flow_prediction":
        return 1.0, -raw_sigma
    return None


def eps_coefs_vp(prediction_type: str, alpha: float, sigma: float):
    """(u, v) with eps = u*x + v*m, as x0_coefs_vp; None if unknown."""
    if prediction_type == "epsilon":
        return 0.0, 1.0
    if prediction_type == "sample":
        return div(1.0, sigma), div(-alpha, sigma)
    if prediction_type == "v_prediction":
        return sigma, alpha
    return None


def x0_coefs_ve(prediction_type: str, sigma: float):
    """(p, q) with x0 = p*x + q*m for x = x0 + sigma*eps (k-diffusion's parameterisation); None if unknown.

    v-prediction there is Salimans' v of the scaled input: x0 = x/(s^2+1) - s/sqrt(s^2+1) m.
    """
    if prediction_type == "epsilon":
        return 1.0, -sigma
    if prediction_type == "v_prediction":
        return 1 / (sigma**2 + 1), -sigma / math.sqrt(sigma**2 + 1)
    if prediction_type in ("sample", "original_sample"):
        return 0.0, 1.0
    return None


def x0_from(x: Tensor, m: Tensor, coefs: tuple[float, float], dtype: torch.dtype) -> Tensor:
    """x0 = p*x + q*m in ``dtype``; the model output itself (not a copy) when x0 = m, as diffusers."""
    p, q = coefs
    if p == 0 and q == 1:
        return m
    return lincomb(x, [(q, m)], x_coef=p, dtype=dtype)


def alpha_sigma(sigma: float, flow: bool = False) -> tuple[float, float]:
    """diffusers' ``_sigma_to_alpha_sigma_t`` in float64: VP (1/sqrt(1+s^2), s/sqrt(1+s^2)) or flow (1-s, s)."""
    if flow:
        return 1.0 - sigma, sigma
    alpha = 1 / math.sqrt(sigma**2 + 1)
    return alpha, sigma * alpha


def log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha) - log(sigma): +inf at sigma = 0 (diffusers' torch.log gives the same)."""
    if sigma == 0:
        return math.inf
    if alpha == 0:
        return -math.inf
    return math.log(alpha) - math.log(sigma)
