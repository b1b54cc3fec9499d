"""Exact laws of the affine samplers, written independently of the package (DESIGN.md "Testing samplers").

For 1-D Gaussian data N(M, C) the perturbed score is linear, s(x, t) = (a M - x) / V with
x_t = a x_0 + s n and V = a^2 C + s^2, so an affine sampler's output is exactly
``v[0] + v[1] x_T + sum_k v[2 + k] z_k``: x_T the prior draw and z_k the Philox draw of counter k
(k = n*S + j, DESIGN's allocation).  ``recursion(name, ...)`` pushes that coefficient vector v
through each step's published formula (score_sde, DDIM, NCSN, EDM; DPM-Solver++ through
k-diffusion's own functions) in float64; ``sampler_coefficients`` recovers the same vector from the
sampler's outputs (they are affine in the draws, so a least-squares fit is exact up to rounding).
Equal vectors mean every step's coefficients are right; the law is then
mean v[0] (x_T has mean 0) and variance v[1]^2 prior_std^2 + sum_k v[2 + k]^2, with no
Monte-Carlo noise anywhere.
"""

from __future__ import annotations

import itertools
import math

import torch

import scorefast as sf
from scorefast.rng import STREAM_SAMPLER
from scorefast.sde import EDM, VESDE, VPSDE

M, C = 0.7, 0.25  # data mean and variance
END = None  # the data end past the last grid time (a = 1, s = 0)


def linear_score(sde):
    """Exact score of N(M, C) perturbed by sde, at t [B]: -(x - a M) / (a^2 C + s^2)."""

    def score(x, t, **_):
        t = t.double()
        a, s = sde.mean_coef(t), sde.std(t)
        return (-(x.double() - (a * M)[:, None]) / (a**2 * C + s**2)[:, None]).to(x.dtype)

    return score


def grid(sde, steps: int) -> list[float]:
    """The default grid of ``steps`` times: uniform in t from T to eps; EDM's rho-schedule in sigma;
    on VP / sub-VP with steps != N, t - eps uniform in its square root (DPM-Solver's quadratic grid)."""
    if isinstance(sde, EDM):
        hi, lo = sde.sigma_max ** (1 / sde.rho), sde.sigma_min ** (1 / sde.rho)
        return [(hi + i / (steps - 1) * (lo - hi)) ** sde.rho for i in range(steps)]
    if isinstance(sde, VPSDE) and steps != sde.N:
        return [sde.T] + [sde.eps + (sde.T - sde.eps) * (1 - i / (steps - 1)) ** 2 for i in range(1, steps)]
    return [sde.T + i / (steps - 1) * (sde.eps - sde.T) for i in range(steps)]


class Affine:
    """Coefficient vectors over the run's Gaussian inputs [1, x_T, z_0, ..., z_{K-1}] (float64)."""

    def __init__(self, sde, draws: int):
        self.sde, self.P = sde, draws + 2

    def e(self, i: int) -> torch.Tensor:
        v = torch.zeros(self.P, dtype=torch.float64)
        v[i] = 1.0
        return v

    def one(self) -> torch.Tensor:
        return self.e(0)

    def x_T(self) -> torch.Tensor:
        return self.e(1)

    def z(self, k: int) -> torch.Tensor:
        return self.e(2 + k)

    def coefs(self, t: float | None) -> tuple[float, float]:
        """(a, s) at t; the data end (t None, past the last grid time) has a = 1, s = 0."""
        if t is None:
            return 1.0, 0.0
        tt = torch.tensor([t], dtype=torch.float64)
        return self.sde.mean_coef(tt).item(), self.sde.std(tt).item()

    def fg(self, t: float) -> tuple[float, float]:
        """Forward drift coefficient f (f(x) = f x) and diffusion g at t."""
        tt = torch.tensor([t], dtype=torch.float64)
        return self.sde.drift_coef(tt).item(), self.sde.diffusion(tt).item()

    def score(self, v: torch.Tensor, t: float) -> torch.Tensor:
        a, s = self.coefs(t)
        return (a * M * self.one() - v) / (a * a * C + s * s)

    def tweedie(self, v: torch.Tensor, t: float) -> torch.Tensor:
        a, s = self.coefs(t)
        return (v + s * s * self.score(v, t)) / a


def law(v: torch.Tensor, sde) -> tuple[float, float]:
    """(mean, variance) of v[0] + v[1] x_T + sum v[2 + k] z_k with x_T ~ N(0, prior_std^2)."""
    return v[0].item(), (v[1] ** 2 * sde.prior_std() ** 2 + (v[2:] ** 2).sum()).item()


# -- the samplers' published steps --------------------------------------------------------------
def _euler_maruyama(A: Affine, times, opts, S):
    x, N = A.x_T(), len(times)
    for n, t in enumerate(times):
        dt = (times[n + 1] if n + 1 < N else 0.0) - t  # score_sde's last step: to t = 0
        f, g = A.fg(t)
        x = x + (f * x - g * g * A.score(x, t)) * dt
        if n < N - 1:  # the last step returns the mean
            x = x + g * math.sqrt(abs(dt)) * A.z(n * S)
    return x


def _reverse_diffusion_step(A: Affine, x, t, t_next, noise_k):
    """score_sde's ReverseDiffusionPredictor with the exact transition (f, G) from t to t_next:
    x_mean = x - f + G^2 s, f = (sqrt(alpha) - 1) x, alpha = abar(t)/abar(t_next), G^2 = s^2 - alpha s'^2."""
    a, s = A.coefs(t)
    a2, s2 = A.coefs(t_next)
    root_alpha = a / a2
    G2 = s * s - root_alpha**2 * s2 * s2
    x = x - (root_alpha - 1) * x + G2 * A.score(x, t)
    return x if noise_k is None else x + math.sqrt(G2) * A.z(noise_k)


def _reverse_diffusion(A: Affine, times, opts, S):
    x, N = A.x_T(), len(times)
    for n, t in enumerate(times):
        x = _reverse_diffusion_step(A, x, t, times[n + 1] if n + 1 < N else END, n * S if n < N - 1 else None)
    return x


def _ancestral(A: Affine, times, opts, S):
    x, N = A.x_T(), len(times)
    for n, t in enumerate(times):
        t_next = times[n + 1] if n + 1 < N else END
        a, s = A.coefs(t)
        a2, s2 = A.coefs(t_next)
        if isinstance(A.sde, VESDE | EDM):  # VE: x + (sigma^2 - sigma'^2) s, std sqrt(sigma'^2 (..)/sigma^2)
            var = s * s - s2 * s2
            x, std = x + var * A.score(x, t), math.sqrt(s2 * s2 * var / (s * s))
        else:  # VP: (x + beta s) / sqrt(1 - beta), std sqrt(beta)
            beta = 1 - (a / a2) ** 2
            x, std = (x + beta * A.score(x, t)) / math.sqrt(1 - beta), math.sqrt(beta)
        if n < N - 1:
            x = x + std * A.z(n * S)
    return x


def _ddim(A: Affine, times, opts, S):
    eta, x, N = opts.get("eta", 0.0), A.x_T(), len(times)
    for n, t in enumerate(times):
        t_next = times[n + 1] if n + 1 < N else END
        a, s = A.coefs(t)
        a2, s2 = A.coefs(t_next)
        score = A.score(x, t)
        x0, eps = (x + s * s * score) / a, -s * score
        sig = eta * (s2 / s) * math.sqrt(max(s * s - (a / a2) ** 2 * s2 * s2, 0.0))
        x = a2 * x0 + math.sqrt(max(s2 * s2 - sig * sig, 0.0)) * eps
        if sig > 0:
            x = x + sig * A.z(n * S)
    return x


def _pc_expected(A: Affine, times, opts, S):
    """pc with the fixed corrector step eps = 2 alpha snr^2 std(t)^2, alpha = abar(t)/abar(t_next)
    (1 on VE), n_corrector corrector draws then the reverse-diffusion predictor's."""
    snr, n_corr, x, N = opts.get("snr", 0.16), opts.get("n_corrector", 1), A.x_T(), len(times)
    for n, t in enumerate(times):
        t_next = times[n + 1] if n + 1 < N else END
        a, s = A.coefs(t)
        eps = 2 * (a / A.coefs(t_next)[0]) ** 2 * snr**2 * s * s
        for j in range(n_corr):
            x = x + eps * A.score(x, t) + math.sqrt(2 * eps) * A.z(n * S + j)
        x = _reverse_diffusion_step(A, x, t, t_next, n * S + n_corr if n < N - 1 else None)
    return x


def _ode_euler(A: Affine, times, opts, S):
    x = A.x_T()
    for t, t_next in itertools.pairwise(times):
        f, g = A.fg(t)
        x = x + (f * x - g * g / 2 * A.score(x, t)) * (t_next - t)
    return A.tweedie(x, times[-1])


def _heun(A: Affine, times, opts, S):
    """EDM Algorithm 2: churn to t_hat, Euler to t_next, trapezoid correction; then Tweedie."""
    churn, tmin, tmax = opts.get("s_churn", 0.0), opts.get("s_tmin", 0.0), opts.get("s_tmax", math.inf)
    s_noise, N, x = opts.get("s_noise", 1.0), len(times), A.x_T()
    gamma = min(churn / (N - 1), math.sqrt(2) - 1)

    def d(v, t):
        f, g = A.fg(t)
        return f * v - g * g / 2 * A.score(v, t)

    for n, (t, t_next) in enumerate(itertools.pairwise(times)):
        t_hat = t * (1 + (gamma if tmin <= t <= tmax else 0.0))
        if t_hat > t:
            x = x + math.sqrt(t_hat**2 - t**2) * s_noise * A.z(n * S)
        d1 = d(x, t_hat)
        x_euler = x + (t_next - t_hat) * d1
        x = x + (t_next - t_hat) / 2 * (d1 + d(x_euler, t_next))
    return A.tweedie(x, times[-1])


def _dpm_solver_pp(A: Affine, times, opts, S):
    """k-diffusion's own sample_dpmpp_2m / _2m_sde / _3m_sde on y = x / a with sigma = s / a (the VE
    form of any x_t = a x_0 + s n), sigmas = the grid's and a final 0 (the Tweedie step): x = y at the end."""
    from tests.peers import k_diffusion_sampling

    kd = k_diffusion_sampling()
    variant = opts.get("variant", "2m")
    eta = opts.get("eta", 1.0 if variant == "2m-sde" else 0.0)
    sigmas = [A.coefs(t)[1] / A.coefs(t)[0] for t in times] + [0.0]

    def denoiser(y, sigma):  # Tweedie of y = x_0 + sigma n: (C y + sigma^2 M) / (C + sigma^2)
        sig2 = sigma.reshape(-1, 1) ** 2
        return (C * y + sig2 * M * A.one()) / (C + sig2)

    draws = iter(range(len(times)))

    def noise_sampler(sigma, sigma_next):
        return A.z(next(draws) * S)[None]

    y0 = (A.x_T() / A.coefs(times[0])[0])[None]
    sig = torch.tensor(sigmas, dtype=torch.float64)
    if variant == "2m":
        out = kd.sample_dpmpp_2m(denoiser, y0, sig, disable=True)
    elif variant == "2m-sde":
        out = kd.sample_dpmpp_2m_sde(denoiser, y0, sig, disable=True, eta=eta, noise_sampler=noise_sampler)
    else:
        out = kd.sample_dpmpp_3m_sde(denoiser, y0, sig, disable=True, eta=eta, noise_sampler=noise_sampler)
    return out[0]


RECURSIONS = {
    "euler_maruyama": _euler_maruyama,
    "reverse_diffusion": _reverse_diffusion,
    "ancestral": _ancestral,
    "ddim": _ddim,
    "pc": _pc_expected,
    "ode_euler": _ode_euler,
    "heun": _heun,
    "dpm_solver++": _dpm_solver_pp,
}


def draws_per_step(name: str, sde, options: dict) -> int:
    module = sf.samplers.get(name)
    return sf.samplers.draws_per_step(module, sf.samplers.validate(module, sde, options))


def recursion(name: str, sde, steps: int, options: dict | None = None) -> torch.Tensor:
    """The output's coefficient vector [1, x_T, z_0..z_{K-1}] (K = steps * S) by the published steps."""
    options = dict(options or {})
    if name == "pc" and options.get("norm") != "expected":
        raise ValueError("pc is affine only with the fixed corrector step (norm='expected')")
    S = draws_per_step(name, sde, options)
    A = Affine(sde, steps * S)
    return RECURSIONS[name](A, grid(sde, steps), options, S)


def sampler_coefficients(name: str, sde, steps: int, options: dict | None = None) -> tuple[torch.Tensor, float]:
    """(the sampler's coefficient vector, relative residual) from a float64 run of B > K + 2 samples:
    the least-squares fit of its outputs on [1, x_T, z_0..z_{K-1}].  A residual at rounding level
    proves the output affine in exactly the counters k = n*S + j the sampler declares."""
    options = dict(options or {})
    K = steps * draws_per_step(name, sde, options)
    B = 2 * (K + 2) + 16
    ids = torch.arange(B)
    x = sf.sample(
        linear_score(sde),
        sde,
        (B, 1),
        sampler=name,
        steps=steps,
        seed=5,
        backend="torch",
        dtype=torch.float64,
        **options,
    )
    x_T = sde.prior_sampling((B, 1), seed=5, sample_ids=ids, dtype=torch.float64, backend="torch")[:, 0]
    zs = [
        sf.randn((B, 1), seed=5, step=k, stream=STREAM_SAMPLER, sample_ids=ids, dtype=torch.float64, backend="torch")
        for k in range(K)
    ]
    design = torch.stack([torch.ones(B, dtype=torch.float64), x_T, *(z[:, 0] for z in zs)], dim=1)
    y = x[:, 0]
    coef = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    residual = (design @ coef - y).abs().max().item() / (y.abs().max().item() + 1e-30)
    return coef, residual


def stochastic(name: str, options: dict) -> bool:
    """Does the sampler follow the reverse SDE (rather than the probability-flow ODE) as steps grow?"""
    if name == "ddim":
        return options.get("eta", 0.0) > 0
    if name == "dpm_solver++":
        return options.get("eta", 1.0 if options.get("variant") == "2m-sde" else 0.0) > 0
    return sf.samplers.get(name).KIND == "sde"


def continuous_limit(name: str, sde, options: dict | None = None) -> tuple[float, float]:
    """(mean, var) of the sampler's limit as steps grow, from the same prior N(0, prior_std^2): the
    probability-flow map T -> eps (a Gaussian transport, closed form) or the reverse SDE's moment
    ODEs T -> eps (RK4, float64), then the Tweedie step at eps, with which every sampler ends (the
    SDE samplers' last step eps -> data end is Tweedie's to O(eps^2))."""
    options = options or {}

    def aV(t):
        tt = torch.tensor([t], dtype=torch.float64)
        a, s = sde.mean_coef(tt).item(), sde.std(tt).item()
        return a, a * a * C + s * s, s

    a_T, V_T, _ = aV(sde.T)
    a_e, V_e, s_e = aV(sde.eps)
    if name == "pc" and options.get("n_corrector", 1) > 0:
        # a Langevin corrector step of fixed size eps(t) at every grid time: as steps grow, the law at
        # each t is the stationary law of that step for p_t, N(a M, V / (1 - eps / 2V)), eps / 2V =
        # alpha snr^2 s^2 / V (alpha = abar(eps) at the last time); not the reverse SDE's from the prior
        shrink = 1 - a_e**2 * options.get("snr", 0.16) ** 2 * s_e**2 / V_e
        m, v = a_e * M, V_e / shrink
    elif not stochastic(name, options):
        gain = math.sqrt(V_e / V_T)  # x_eps - a_eps M = gain (x_T - a_T M)
        m, v = a_e * M + gain * (0.0 - a_T * M), gain**2 * sde.prior_std() ** 2
    else:
        m, v = _reverse_sde_moments(sde)
    keep = 1 - s_e**2 / V_e  # Tweedie at eps: x0 = (keep x + s^2 a M / V) / a
    return (keep * m + s_e**2 * a_e * M / V_e) / a_e, (keep / a_e) ** 2 * v


_MOMENTS: dict[str, tuple[float, float]] = {}


def _reverse_sde_moments(sde, n: int = 4_000) -> tuple[float, float]:
    """Mean and variance of the reverse SDE from N(0, prior_std^2) at T to eps (RK4 in float64;
    cached per SDE configuration: several samplers share one limit)."""
    key = repr(sde)
    if key not in _MOMENTS:
        _MOMENTS[key] = _integrate_moments(sde, n)
    return _MOMENTS[key]


def _integrate_moments(sde, n: int) -> tuple[float, float]:
    """RK4 on dm/dt = f m + g^2 (m - a M) / V, dv/dt = 2 (f + g^2 / V) v - g^2 from T down to eps, with
    the coefficients at every stage time taken in one vectorised call (float64)."""
    h = (sde.eps - sde.T) / n
    t = sde.T + torch.arange(2 * n + 1, dtype=torch.float64) * (h / 2)  # every step's start, middle, end
    a, s = sde.mean_coef(t), sde.std(t)
    f, g2, V = sde.drift_coef(t).tolist(), (sde.diffusion(t) ** 2).tolist(), (a * a * C + s * s).tolist()
    aM = (a * M).tolist()

    def rhs(k, m, v):
        return f[k] * m + g2[k] * (m - aM[k]) / V[k], 2 * (f[k] + g2[k] / V[k]) * v - g2[k]

    m, v = 0.0, sde.prior_std() ** 2
    for i in range(n):
        k1 = rhs(2 * i, m, v)
        k2 = rhs(2 * i + 1, m + h / 2 * k1[0], v + h / 2 * k1[1])
        k3 = rhs(2 * i + 1, m + h / 2 * k2[0], v + h / 2 * k2[1])
        k4 = rhs(2 * i + 2, m + h * k3[0], v + h * k3[1])
        m += h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        v += h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    return m, v
