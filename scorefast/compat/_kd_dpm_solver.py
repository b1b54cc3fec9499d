"""DPM-Solver (Lu et al. 2022) as k-diffusion's ``DPMSolver`` class runs it, on the fused update.

k-diffusion works in eps = (x - D(x; sigma)) / sigma and the time t = -log sigma.  Every stage
state and every step's result is x minus a combination of earlier eps's:

    u = x - alpha eps - beta (eps_j - eps),  eps = (x - D_0) / sigma_s,  eps_j = (u_j - D_j) / sigma_j
      = (1 - a) x + a D_0 - b u_j + b D_j,   a = (alpha - beta) / sigma_s,  b = beta / sigma_j,

so each stage is one fused pass ``x_coef x + sum c t (+ noise z)`` over x, the denoiser outputs and
the stage states, its coefficients computed in float64.  ``plan`` gives them for one step: Python
floats for DPM-Solver-fast's shared grid, per-sample [B] tensors for the adaptive solver, whose
samples each keep their own time, step size and PID state (element-wise float64 arithmetic and the
fixed-order ``sf.ops.sample_norm``, so a sample's trajectory does not depend on the batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..ops import sample_norm

Coefs = tuple  # (x_coef, c_1, ..., c_k): floats, or [B] float64 tensors


def plan(s, t_next, r1: float, r2: float | None = None) -> dict:
    """Stage coefficients of one DPM-Solver step from t = s to t_next (float64 tensors, any shape).

    Keys: ``x1`` (first order: x, D_0); ``u1`` (state at s + r1 h: x, D_0) and ``sigma1``; ``x2``
    (second order: x, D_0, u1, D_1); with r2: ``u2`` (x, D_0, u1, D_1), ``sigma2`` and ``x3`` (third
    order: x, D_0, u2, D_2).  The formulas are k-diffusion's ``dpm_solver_{1,2,3}_step``.
    """
    h = t_next - s
    sig_s, sig_n = torch.exp(-s), torch.exp(-t_next)
    em = torch.expm1(h)
    sig1 = torch.exp(-(s + r1 * h))

    def combo(alpha, beta=None, sig_j=None) -> Coefs:
        if beta is None:
            a = alpha / sig_s
            return (1 - a, a)
        a = (alpha - beta) / sig_s
        b = beta / sig_j
        return (1 - a, a, -b, b)

    p = {
        "x1": combo(sig_n * em),
        "sigma1": sig1,
        "u1": combo(sig1 * torch.expm1(r1 * h)),
        "x2": combo(sig_n * em, sig_n / (2 * r1) * em, sig1),
    }
    if r2 is not None:
        sig2 = torch.exp(-(s + r2 * h))
        e2 = torch.expm1(r2 * h)
        p["sigma2"] = sig2
        p["u2"] = combo(sig2 * e2, sig2 * (r2 / r1) * (e2 / (r2 * h) - 1), sig1)
        p["x3"] = combo(sig_n * em, sig_n / r2 * (em / h - 1), sig2)
    return p


def _floats(p: dict) -> dict:
    return {k: (float(v) if isinstance(v, Tensor) else tuple(float(c) for c in v)) for k, v in p.items()}


def combine(update: Callable, x: Tensor, coefs: Coefs, terms: tuple, **noise) -> Tensor:
    """One fused pass: coefs[0] x + sum coefs[j] terms[j - 1] (+ noise)."""
    x_coef, *cs = coefs
    return update(x, list(zip(cs, terms)), x_coef=x_coef, **noise)


def _ancestral(sigma_from, sigma_to, eta: float):
    """k-diffusion's get_ancestral_step for floats or tensors: (sigma_down, sigma_up)."""
    up = eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    up = torch.minimum(sigma_to, up) if isinstance(up, Tensor) else min(sigma_to, up)
    return (sigma_to**2 - up**2) ** 0.5, up


def fast(run, x: Tensor, sigma_min: float, sigma_max: float, nfe: int, *, eta, s_noise, callback, pbar) -> Tensor:
    """DPM-Solver-fast: nfe evaluations on a uniform grid in t, orders 3, ..., 3 then 2, 1 or nfe % 3."""
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    m = nfe // 3 + 1
    ts = torch.linspace(t_start, t_end, m + 1, dtype=torch.float64).tolist()
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]

    def ev(u, sigma):
        pbar.update(1)
        return run.denoise(u, x.new_full((x.shape[0],), sigma))

    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_to, su = t_next, 0.0
        if eta:
            sd, _ = _ancestral(math.exp(-t), math.exp(-t_next), eta)
            t_to = min(t_end, -math.log(sd)) if sd > 0 else t_end
            su = max(0.0, math.exp(-t_next) ** 2 - math.exp(-t_to) ** 2) ** 0.5
        sigma = math.exp(-t)
        D0 = ev(x, sigma)
        if callback is not None:
            tt = torch.tensor(t, dtype=torch.float64)
            callback(
                {
                    "sigma": tt.neg().exp(),
                    "sigma_hat": tt.neg().exp(),
                    "x": x,
                    "i": i,
                    "t": tt,
                    "t_up": tt,
                    "denoised": D0,
                }
            )
        p = _floats(plan(torch.tensor(t, dtype=torch.float64), torch.tensor(t_to, dtype=torch.float64), *_RS[order]))
        noise = {
            "noise": su * s_noise,
            "step": i,
            "sigma": torch.tensor(sigma),
            "sigma_next": torch.tensor(math.exp(-t_next)),
        }
        if order == 1:
            x = combine(run.update, x, p["x1"], (D0,), **noise)
            continue
        u1 = combine(run.update, x, p["u1"], (D0,))
        D1 = ev(u1, p["sigma1"])
        if order == 2:
            x = combine(run.update, x, p["x2"], (D0, u1, D1), **noise)
            continue
        u2 = combine(run.update, x, p["u2"], (D0, u1, D1))
        D2 = ev(u2, p["sigma2"])
        x = combine(run.update, x, p["x3"], (D0, u2, D2), **noise)
    return x


_RS = {1: (0.5,), 2: (0.5,), 3: (1 / 3, 2 / 3)}  # k-diffusion's r1 (and r2) for each order


class _PID:
    """k-diffusion's ``PIDStepSizeController``, one per sample: [B] float64 step sizes and error history."""

    def __init__(self, h: Tensor, pcoeff, icoeff, dcoeff, order, accept_safety, eps: float = 1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety, self.eps = accept_safety, eps
        self.errs: list[Tensor] | None = None

    def propose(self, error: Tensor, active: Tensor) -> Tensor:
        """accept [B] bool; h and the history change for active samples only."""
        inv = 1 / (error + self.eps)
        if self.errs is None:
            self.errs = [inv, inv, inv]
        e1, e2 = self.errs[1], self.errs[2]
        # e0^b1 e1^b2 e2^b3 through exp/log: element-wise exp and log round the same way at every
        # position of a vector, pow does not
        factor = torch.exp(self.b1 * torch.log(inv) + self.b2 * torch.log(e1) + self.b3 * torch.log(e2))
        factor = 1 + torch.atan(factor - 1)
        accept = factor >= self.accept_safety
        moved = accept & active
        self.errs = [torch.where(active, inv, self.errs[0]), torch.where(moved, inv, e1), torch.where(moved, e1, e2)]
        self.h = torch.where(active, self.h * factor, self.h)
        return accept


def adaptive(
    run,
    x: Tensor,
    sigma_min: float,
    sigma_max: float,
    *,
    order: int,
    rtol: float,
    atol: float,
    h_init: float,
    pcoeff: float,
    icoeff: float,
    dcoeff: float,
    accept_safety: float,
    eta: float,
    s_noise: float,
    callback,
    pbar,
) -> tuple[Tensor, dict]:
    """DPM-Solver-12 (order 2) or -23 (order 3) with error control per sample.

    Each attempt evaluates the whole batch (samples that finished take an identity step at their
    own sigma); a sample accepts when its own PID factor allows, with its own error norm
    ||(x_low - x_high) / max(atol, rtol max(|x_low|, |x_prev|))|| / sqrt(D).
    """
    B, D = x.shape[0], max(1, x[0].numel())
    f64 = {"dtype": torch.float64, "device": x.device}
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    forward = t_end > t_start
    pid = _PID(
        torch.full((B,), abs(h_init) * (1 if forward else -1), **f64),
        pcoeff,
        icoeff,
        dcoeff,
        1.5 if eta else order,
        accept_safety,
    )
    r = _RS[order]
    s = torch.full((B,), t_start, **f64)
    x_prev_abs = x.abs()
    zeros = torch.zeros(B, dtype=torch.int64, device=x.device)
    counts = {"steps": zeros, "nfe": zeros, "n_accept": zeros, "n_reject": zeros}

    def running(s: Tensor) -> Tensor:
        return s < t_end - 1e-5 if forward else s > t_end + 1e-5

    def ev(u, sigma: Tensor) -> Tensor:
        pbar.update(1)
        return run.denoise(u, sigma.to(x.dtype))

    def stage(coefs: Coefs, terms: tuple) -> Tensor:
        """A stage of active samples; others keep x (identity coefficients)."""
        masked = (torch.where(active, coefs[0], 1.0), *(torch.where(active, c, 0.0) for c in coefs[1:]))
        return combine(lambda y, ts, x_coef: run.fused(y, ts, x_coef=x_coef), x, masked, terms)

    active = running(s)
    n = 0
    while bool(active.any()):
        t = torch.clamp(s + pid.h, max=t_end) if forward else torch.clamp(s + pid.h, min=t_end)
        sig_s = torch.exp(-s)
        t_to, su = t, torch.zeros_like(s)
        if eta:
            sd, _ = _ancestral(sig_s, torch.exp(-t), eta)
            t_to = torch.clamp(-torch.log(sd), max=t_end)  # sd = 0: -log 0 = inf -> t_end
            su = (torch.exp(-t) ** 2 - torch.exp(-t_to) ** 2).clamp_min(0.0).sqrt()
        stuck = active & (t_to == s)
        p = plan(s, torch.where(active & ~stuck, t_to, s + 1.0), *r)
        D0 = ev(x, sig_s)
        u1 = stage(p["u1"], (D0,))
        D1 = ev(u1, torch.where(active, p["sigma1"], sig_s))
        if order == 2:
            x_low = stage(p["x1"], (D0,))
            x_high = stage(p["x2"], (D0, u1, D1))
        else:
            u2 = stage(p["u2"], (D0, u1, D1))
            D2 = ev(u2, torch.where(active, p["sigma2"], sig_s))
            x_low = stage(p["x2"], (D0, u1, D1))
            x_high = stage(p["x3"], (D0, u2, D2))
        low_abs = x_low.abs()
        delta = torch.maximum(low_abs, x_prev_abs).mul_(rtol).clamp_min_(atol)
        error = sample_norm((x_low - x_high).div_(delta)).double() / math.sqrt(D)
        error = torch.where(active, error, 0.0)
        bad = active & ~torch.isfinite(error)
        accept = pid.propose(error, active) & active
        a = accept.double()
        terms = [(a, x_high)]
        if eta and run.noise_sampler is not None:
            terms.append((a * su * s_noise, _sampled_noise(run.noise_sampler, x, accept & (su > 0), sig_s, t)))
            noise = 0.0
        else:
            noise = a * su * s_noise if eta else 0.0
        x = run.fused(x, terms, x_coef=1 - a, noise=noise, seed=run.seed, step=n)
        x_prev_abs = torch.where(accept.reshape(-1, *[1] * (x.dim() - 1)), low_abs, x_prev_abs)
        s = torch.where(accept, t, s)
        counts = {
            "steps": counts["steps"] + active,
            "nfe": counts["nfe"] + order * active,
            "n_accept": counts["n_accept"] + accept,
            "n_reject": counts["n_reject"] + (active & ~accept),
        }
        flags = torch.stack([bad.any(), stuck.any()]).tolist()
        if flags[0] or flags[1]:
            b = int((bad | stuck).nonzero()[0, 0])
            what = "the error estimate is not finite" if flags[0] else "the step size underflowed"
            raise NonFiniteError(f"dpm_adaptive: {what} at attempt {n} for sample {b} (sigma {float(sig_s[b]):.6g})")
        if callback is not None:
            sig = torch.exp(-s)
            callback(
                {"sigma": sig, "sigma_hat": sig, "x": x, "i": n, "t": s, "t_up": s, "denoised": D0}
                | {"error": error, "h": pid.h}
                | _summary(counts)
            )
        active = running(s)
        n += 1
    return x, _summary(counts) | {f"{k}_per_sample": v for k, v in counts.items()}


def _summary(counts: dict) -> dict:
    """k-diffusion's info keys as ints: the batch's worst sample (k-diffusion's own counts when B = 1)."""
    return {k: int(v.max()) if v.numel() else 0 for k, v in counts.items()}


def _sampled_noise(noise_sampler, x: Tensor, rows: Tensor, sig_s: Tensor, t: Tensor) -> Tensor:
    """Row b of noise_sampler(sigma_b, sigma_next_b), one call per distinct (sigma, sigma_next) pair."""
    out = torch.zeros_like(x)
    idx = rows.nonzero().flatten().tolist()
    sig_next = torch.exp(-t)
    groups: dict[tuple[float, float], list[int]] = {}
    for b in idx:
        groups.setdefault((float(sig_s[b]), float(sig_next[b])), []).append(b)
    for (a, b_), members in groups.items():
        z = noise_sampler(torch.tensor(a), torch.tensor(b_))
        sel = torch.tensor(members, device=x.device)
        out[sel] = z[sel].to(x.dtype)
    return out
