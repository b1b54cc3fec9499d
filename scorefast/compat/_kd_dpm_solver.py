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
from ._fused import RowsUpdater

Coefs = tuple  # (x_coef, c_1, ..., c_k): floats, or [B] float64 tensors
_RS = {1: (0.5,), 2: (0.5,), 3: (1 / 3, 2 / 3)}  # k-diffusion's r1 (and r2) for each order


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


class _PID:
    """k-diffusion's ``PIDStepSizeController``, one per sample: [B] float64 step sizes and error history."""

    def __init__(self, h: Tensor, pcoeff, icoeff, dcoeff, order, accept_safety, eps: float = 1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety, self.eps = accept_safety, eps
        self.errs: list[Tensor] | None = None

    def propose(self, error: Tensor) -> Tensor:
        """accept [n] bool for the n running samples; their h and error history move on."""
        inv = 1 / (error + self.eps)
        if self.errs is None:
            self.errs = [inv, inv, inv]
        e1, e2 = self.errs[1], self.errs[2]
        # e0^b1 e1^b2 e2^b3 through exp/log: element-wise exp and log round the same way at every
        # position of a vector, pow does not
        factor = torch.exp(self.b1 * torch.log(inv) + self.b2 * torch.log(e1) + self.b3 * torch.log(e2))
        factor = 1 + torch.atan(factor - 1)
        accept = factor >= self.accept_safety
        self.errs = [inv, torch.where(accept, inv, e1), torch.where(accept, e1, e2)]
        self.h = self.h * factor
        return accept

    def keep(self, rows: Tensor) -> None:
        """Only the samples ``rows`` go on."""
        self.h = self.h[rows]
        if self.errs is not None:
            self.errs = [e[rows] for e in self.errs]


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

    A sample accepts when its own PID factor allows, from its own error norm
    ||(x_low - x_high) / max(atol, rtol max(|x_low|, |x_prev|))|| / sqrt(D).  Samples that reach
    sigma_min leave the batch: later attempts evaluate the model on the samples still running
    (``extra_args`` tensors with B rows are taken with them), with their own Philox sample ids.
    """
    B, D = x.shape[0], max(1, x[0].numel() if x.shape[0] else 1)
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
    out = x.clone()  # every sample's latest state; rows still running are overwritten when they finish
    live = _Live(run, x, torch.arange(B, device=x.device))
    s = torch.full((B,), t_start, **f64)
    x_prev_abs = x.abs()
    counts = {k: torch.zeros(B, dtype=torch.int64, device=x.device) for k in ("steps", "nfe", "n_accept", "n_reject")}
    seen = None  # with a callback: the whole batch's latest t, h, error and denoised
    if callback is not None:
        seen = {"s": s.clone(), "h": pid.h.clone(), "error": torch.zeros(B, **f64), "denoised": torch.zeros_like(x)}

    def running(s: Tensor) -> Tensor:
        return s < t_end - 1e-5 if forward else s > t_end + 1e-5

    def ev(u, sigma: Tensor) -> Tensor:
        pbar.update(1)
        return live.model(u, sigma)

    def stage(coefs: Coefs, terms: tuple) -> Tensor:
        return combine(lambda y, ts, x_coef: live.update(y, ts, x_coef=x_coef), x, coefs, terms)

    if B == 0 or not bool(running(s).all()):  # sigma_min and sigma_max within 1e-5 in t: nothing to do
        return out, _summary(counts) | {f"{k}_per_sample": v for k, v in counts.items()}
    n = 0
    while True:
        t = torch.clamp(s + pid.h, max=t_end) if forward else torch.clamp(s + pid.h, min=t_end)
        sig_s = torch.exp(-s)
        t_to, su = t, None
        if eta:
            sd, _ = _ancestral(sig_s, torch.exp(-t), eta)
            t_to = torch.clamp(-torch.log(sd), max=t_end)  # sd = 0: -log 0 = inf -> t_end
            su = (torch.exp(-t) ** 2 - torch.exp(-t_to) ** 2).clamp_min(0.0).sqrt()
        stuck = t_to == s
        p = plan(s, torch.where(stuck, s + 1.0, t_to), *r)  # a stuck sample raises below
        D0 = ev(x, sig_s)
        u1 = stage(p["u1"], (D0,))
        D1 = ev(u1, p["sigma1"])
        if order == 2:
            x_low = stage(p["x1"], (D0,))
            x_high = stage(p["x2"], (D0, u1, D1))
        else:
            u2 = stage(p["u2"], (D0, u1, D1))
            D2 = ev(u2, p["sigma2"])
            x_low = stage(p["x2"], (D0, u1, D1))
            x_high = stage(p["x3"], (D0, u2, D2))
        low_abs = x_low.abs()
        delta = torch.maximum(low_abs, x_prev_abs).mul_(rtol).clamp_min_(atol)
        error = sample_norm((x_low - x_high).div_(delta)).double() / math.sqrt(D)
        bad = ~torch.isfinite(error)
        accept = pid.propose(error)
        a = accept.double()
        terms = [(a, x_high)]
        noise = 0.0
        if eta and run.noise_sampler is not None:
            rows = accept & (su > 0)
            terms.append((a * su * s_noise, _sampled_noise(run.noise_sampler, x, live.ids, rows, sig_s, t)))
        elif eta:
            noise = a * su * s_noise
        x = live.update(x, terms, x_coef=1 - a, noise=noise, seed=run.seed, step=n)
        x_prev_abs = torch.where(accept.reshape(-1, *[1] * (x.dim() - 1)), low_abs, x_prev_abs)
        s = torch.where(accept, t, s)
        for key, add in (("steps", 1), ("nfe", order), ("n_accept", accept), ("n_reject", ~accept)):
            counts[key].index_add_(0, live.ids, torch.as_tensor(add, device=x.device).long().expand(len(s)))
        still = running(s)
        flags = torch.stack([bad.any(), stuck.any(), still.all()]).tolist()
        if flags[0] or flags[1]:
            b = int((bad | stuck).nonzero()[0, 0])
            what = "the error estimate is not finite" if flags[0] else "the step size underflowed"
            raise NonFiniteError(
                f"dpm_adaptive: {what} at attempt {n} for sample {int(live.ids[b])} (sigma {float(sig_s[b]):.6g})"
            )
        if seen is not None:
            for key, v in (("s", s), ("h", pid.h), ("error", error), ("denoised", D0)):
                seen[key].index_copy_(0, live.ids, v)
            sig = torch.exp(-seen["s"])
            callback(
                {"sigma": sig, "sigma_hat": sig, "x": out.index_copy(0, live.ids, x), "i": n, "t": seen["s"]}
                | {"t_up": seen["s"], "denoised": seen["denoised"].clone(), "error": seen["error"], "h": seen["h"]}
                | _summary(counts)
            )
        n += 1
        if not flags[2]:  # some samples finished: keep their result, go on with the others
            out.index_copy_(0, live.ids, x)
            keep = still.nonzero().flatten()
            if keep.numel() == 0:
                break
            x, x_prev_abs, s = x[keep], x_prev_abs[keep], s[keep]
            pid.keep(keep)
            live.keep(keep)
    return out, _summary(counts) | {f"{k}_per_sample": v for k, v in counts.items()}


class _Live:
    """The samples still running: their ids, the model on them (with their rows of the extra_args
    tensors that have B rows) and the fused update with their own Philox sample ids."""

    def __init__(self, run, x: Tensor, ids: Tensor):
        self.run, self.ids = run, ids
        self.extra = dict(run.extra)
        B = x.shape[0]
        self.per_sample = [k for k, v in self.extra.items() if isinstance(v, Tensor) and v.dim() and v.shape[0] == B]
        self.update = RowsUpdater(ids)

    def model(self, u: Tensor, sigma: Tensor) -> Tensor:
        return self.run.model(u, sigma.to(u.dtype), **self.extra)

    def keep(self, rows: Tensor) -> None:
        self.ids = self.ids[rows]
        self.update.ids = self.ids
        for k in self.per_sample:
            self.extra[k] = self.extra[k][rows.to(self.extra[k].device)]


def _summary(counts: dict) -> dict:
    """k-diffusion's info keys as ints: the batch's worst sample (k-diffusion's own counts when B = 1)."""
    return {k: int(v.max()) if v.numel() else 0 for k, v in counts.items()}


def _sampled_noise(noise_sampler, x: Tensor, ids: Tensor, rows: Tensor, sig_s: Tensor, t: Tensor) -> Tensor:
    """Row r: row ids[r] of noise_sampler(sigma_r, sigma_next_r) (the sampler sees the whole batch's
    shape), one call per distinct (sigma, sigma_next) pair among ``rows``; zeros elsewhere."""
    out = torch.zeros_like(x)
    sig_next = torch.exp(-t)
    groups: dict[tuple[float, float], list[int]] = {}
    for r in rows.nonzero().flatten().tolist():
        groups.setdefault((float(sig_s[r]), float(sig_next[r])), []).append(r)
    for (sigma, sigma_next), members in groups.items():
        z = noise_sampler(torch.tensor(sigma), torch.tensor(sigma_next))
        sel = torch.tensor(members, device=x.device)
        out[sel] = z[ids[sel].to(z.device)].to(device=x.device, dtype=x.dtype)
    return out
