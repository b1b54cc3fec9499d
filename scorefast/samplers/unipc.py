"""UniPC (Zhao et al. 2023): the unified predictor UniP-p and corrector UniC-p in data prediction.

With lambda = log(a / s) (x_t = a x_0 + s n), h = lambda_{n+1} - lambda_n and D_n the Tweedie x0 at
(x_n, t_n), the predictor from t_n to t_{n+1} is

    x_{n+1} = (s_{n+1} / s_n) x_n + a_{n+1} (1 - e^{-h}) D_n - a_{n+1} B(h) sum_i rho_i (D_{n-i} - D_n) / r_i,

r_i = (lambda_{n-i} - lambda_n) / h, and B(h) = h ("bh1") or e^h - 1 ("bh2") in the sign convention
of the paper's data-prediction form (here -h and e^{-h} - 1).  rho solves the order conditions
R rho = b (R_kj = r_j^(k-1), b_k from the phi functions; p = 2 uses rho = 1/2, as the paper and
diffusers do).  The corrector UniC re-takes the step t_{n-1} -> t_n once D_n (evaluated at the
predicted x_n) is known, with D_n as one more point of the fit:

    x_n^c = (s_n / s_{n-1}) x_{n-1}^c + a_n (1 - e^{-h}) D_{n-1} - a_n B(h) (sum_i rho_i (D_{n-1-i} - D_{n-1}) / r_i
            + rho_last (D_n - D_{n-1})),

which raises the order by one at no extra NFE (D_n is the evaluation the next predictor needs).  The
next predictor starts from x_n^c.  The predictor order warms up (p_n = min(order, n + 1)) and drops
in the last steps (``lower_order_final``); the corrector at step n has the order of the predictor it
corrects.  Two conventions for which step is the last:

- ``"uni_pc"`` (default): the UniPC authors' code (their multistep loop lowers the order at every
  step count; DPM-Solver's official loop does so only below 10-15 steps), whose last step ends at the
  grid's end eps before the optional denoising: p_n <= N - 1 - n, so the last interval is UniP-1.
- ``True`` (or ``"diffusers"``): diffusers' ``UniPCMultistepScheduler`` (``predict_x0=True``,
  ``final_sigmas_type="zero"``) on the same grid, whose last step is the jump from t_{N-1} to
  sigma = 0: p_n <= N - n.  That jump returns D(x_{N-1}), our closing Tweedie step; its corrector
  does not change the output, so we skip it.  With this option every step matches diffusers'.
- ``False``: no lowering.

Why the authors' rule is the default (the quality suite's study, 20 steps, error to the exact
probability-flow solution of the same prior draws against dpm_solver++ 2m on the same grid): the
last interval into eps is long in log-SNR on some default grids (DiscreteVP's integer
timesteps: h = 2.9 after 0.67; RectifiedFlow's: 4.0 after 0.74), and a multistep extrapolation across
it is what made UniPC-2 with diffusers' rule 16% worse than dpm_solver++ on DiscreteVP; order 1 there
makes UniPC-2's error 0.07-0.85x dpm_solver++'s on VP, VE, EDM, DiscreteVP and RectifiedFlow with the
2-D rings and the 16-D / 64-D mixtures (one case within noise of 1: the 64-D mixture under
VESDE(0.01, 10), 1.11 +- 0.33).  The cost: one first-order interval caps the asymptotic order in
steps at 2 (``False`` or diffusers' rule for convergence studies).

Over the N-1 intervals between grid times (one NFE each), then the Tweedie step: N NFE in all.
Every coefficient is computed once per run on the host in float64 (``ctx.table``); a step is the
Tweedie pass, one fused corrector pass and one fused predictor pass over x and the stored D's.
"""

from __future__ import annotations

import math

import torch

from .._checks import check_bool, check_choice, check_int
from .base import Context, Step
from .ode_euler import tweedie

NAME = "unipc"
DRAWS = 1
DEFAULT_STEPS = 20
KIND = "ode"
VARIANTS = ("bh1", "bh2")
MAX_ORDER = 3


FINAL_RULES = ("uni_pc", "diffusers")  # lower_order_final's conventions (True is "diffusers")


def validate(sde, *, order, variant, corrector, lower_order_final, denoise) -> dict:
    """The options checked and normalised (ValueError/TypeError naming the option): order an int in
    [1, 3], variant "bh1" or "bh2", lower_order_final "uni_pc", "diffusers" or a bool (True is
    "diffusers", the old meaning), the other flags bools."""
    order = check_int("order", order, minimum=1)
    if order > MAX_ORDER:
        raise ValueError(f"order: UniPC here has order <= {MAX_ORDER}, got {order}")
    if isinstance(lower_order_final, str):
        final = check_choice("lower_order_final", lower_order_final, FINAL_RULES)
    else:
        final = "diffusers" if check_bool("lower_order_final", lower_order_final) else False
    return {
        "order": order,
        "variant": check_choice("variant", variant, VARIANTS),
        "corrector": check_bool("corrector", corrector),
        "lower_order_final": final,
        "denoise": check_bool("denoise", denoise),
    }


def run(
    ctx: Context,
    x,
    *,
    order: int = 2,
    variant: str = "bh2",
    corrector: bool = True,
    lower_order_final: bool | str = "uni_pc",
    denoise: bool = True,
):
    """Options validated by ``validate`` (``lower_order_final``: see the module docstring)."""
    times = ctx.times.to("cpu", torch.float64)
    a, s = ctx.sde.mean_coef(times), ctx.sde.std(times)
    lam = torch.log(a / s)
    if not bool(torch.isfinite(lam).all()):
        raise ValueError("schedule: UniPC needs 0 < mean_coef and 0 < std at every grid time (log-SNR finite)")
    N = len(times)
    sched = ctx.table(coefficients(lam.tolist(), a.tolist(), s.tolist(), order, variant, corrector, lower_order_final))
    P = 2 + MAX_ORDER  # the predictor's first column
    width = order  # D's the carry keeps once warmed up: D_{n-order+1} .. D_n, oldest first

    def step(n: Step, x, *rest):
        """rest = (x_c, D_{n-k}, ..., D_{n-1}) with the corrector, (D_{n-k}, ..., D_{n-1}) without.

        History is oldest first, so that the carry returned shifts every buffer towards the front
        (output i is input i + 1 or a fresh tensor): copying outputs back into static buffers in
        order never reads a buffer already overwritten."""
        t = ctx.time(n)
        D = ctx.denoised(x, n, ctx.score(x, t))
        history = rest[1:] if corrector else rest
        newest_first = history[::-1]
        if corrector and len(rest) > 0:  # UniC: re-take the step t_{n-1} -> t_n with D_n known
            cols = (*range(2 + len(newest_first)), 0.0)  # x_c, D_n, D_{n-1}, ...; no noise
            x = ctx.update_row(rest[0], sched, n, [D, *newest_first], cols=cols, noise=False)
        used = newest_first[: MAX_ORDER - 1]
        cols = (*range(P, P + 2 + len(used)), 0.0)  # x, D_n, D_{n-1}, D_{n-2}; no noise
        x_next = ctx.update_row(x, sched, n, [D, *used], cols=cols, noise=False)
        x_next = ctx.step_done(n, x_next, t, D)
        kept = (*history, D)[-width:]
        return (x_next, x, *kept) if corrector else (x_next, *kept)

    warm = min(order, N - 1)  # steps whose carry is still growing: one at a time, eagerly
    carry = (x,)
    for n in range(warm):
        carry = ctx.steps(step, carry, n, n + 1)
    x = ctx.steps(step, carry, warm, N - 1)[0]
    return tweedie(ctx, x, denoise)


def orders(N: int, order: int, lower_order_final: bool | str) -> list[int]:
    """The predictor order p_n of each interval n = 0 .. N-2: the warm-up min(order, n + 1), capped in
    the last steps at N - 1 - n ("uni_pc") or N - n ("diffusers" / True), or not (False)."""
    last = {"uni_pc": N - 1, "diffusers": N, True: N}.get(lower_order_final)
    return [min(order, n + 1) if last is None else min(order, n + 1, last - n) for n in range(N - 1)]


def _phi_b(h: float, p: int, variant: str) -> tuple[float, float, list[float]]:
    """(h phi_1 = e^{-h} - 1, B(h), [b_1 .. b_p]) of the order conditions, in data prediction."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    B = hh if variant == "bh1" else h_phi_1
    g, fact, b = h_phi_1 / hh - 1, 1, []
    for k in range(1, p + 1):
        b.append(g * fact / B)
        fact *= k + 1
        g = g / hh - 1 / fact
    return h_phi_1, B, b


def _rhos(r: list[float], b: list[float], full: bool) -> list[float]:
    """Solve R rho = b with R_kj = r_j^(k-1) over nodes r (+ the node 1 when ``full``)."""
    nodes = [*r, 1.0] if full else r
    R = torch.tensor([[v**k for v in nodes] for k in range(len(nodes))], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b[: len(nodes)], dtype=torch.float64)).tolist()


def predictor_coefs(lam, a, s, n: int, p: int, variant: str) -> list[float]:
    """UniP-p from t_n to t_{n+1}: [x_n coef, D_n coef, D_{n-1}, D_{n-2} coefs] (unused ones 0)."""
    h = lam[n + 1] - lam[n]
    h_phi_1, B, b = _phi_b(h, p, variant)
    r = [(lam[n - i] - lam[n]) / h for i in range(1, p)]
    rho = [] if p == 1 else [0.5] if p == 2 else _rhos(r, b, full=False)
    a_n = a[n + 1]
    hist = [-a_n * B * rho_i / r_i for rho_i, r_i in zip(rho, r, strict=True)]
    new = -a_n * h_phi_1 - sum(hist)
    return [s[n + 1] / s[n], new, *hist, *[0.0] * (MAX_ORDER - 1 - len(hist))]


def corrector_coefs(lam, a, s, n: int, p: int, variant: str) -> list[float]:
    """UniC-p re-taking t_{n-1} -> t_n: [x_{n-1}^c coef, D_n coef, D_{n-1}, D_{n-2}, D_{n-3} coefs]."""
    m = n - 1
    h = lam[n] - lam[m]
    h_phi_1, B, b = _phi_b(h, p, variant)
    r = [(lam[m - i] - lam[m]) / h for i in range(1, p)]
    rho = [0.5] if p == 1 else _rhos(r, b, full=True)
    a_n = a[n]
    hist = [-a_n * B * rho_i / r_i for rho_i, r_i in zip(rho[:-1], r, strict=True)]
    new = -a_n * B * rho[-1]
    prev = -a_n * h_phi_1 - sum(hist) - new
    return [s[n] / s[m], new, prev, *hist, *[0.0] * (MAX_ORDER - 1 - len(hist))]


def coefficients(
    lam, a, s, order: int, variant: str, corrector: bool, lower_order_final: bool | str
) -> list[list[float]]:
    """Per interval n: 2 + MAX_ORDER corrector columns (x, D_n, D_{n-1}, ...) then 1 + MAX_ORDER predictor columns."""
    N = len(lam)
    p = orders(N, order, lower_order_final)
    rows = []
    for n in range(N - 1):
        if corrector and n > 0:
            c = corrector_coefs(lam, a, s, n, p[n - 1], variant)
        else:
            c = [1.0] + [0.0] * (1 + MAX_ORDER)
        rows.append(c + predictor_coefs(lam, a, s, n, p[n], variant))
    return rows
