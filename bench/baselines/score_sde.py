"""Eager PyTorch copies of score_sde's sampling loops (Song et al. 2021, sampling.py), for racing.

Kept faithful to the original structure: per-step predictor and corrector objects calling the
reverse SDE, noise from torch.randn_like, batch-mean norms in the Langevin corrector, x_mean
returned at the end (denoise=True).  Only the model call is abstracted to score_fn(x, t).
"""

from __future__ import annotations

import torch

from bench.baselines import _col


def _rsde(sde, score_fn, x, t, probability_flow=False):
    """score_sde's ReverseSDE.sde: drift f - g^2 s (x 0.5 for the probability flow), diffusion g."""
    drift, diffusion = sde.sde(x, t)
    score = score_fn(x, t)
    drift = drift - _col(diffusion, x) ** 2 * score * (0.5 if probability_flow else 1.0)
    return drift, diffusion


def _rsde_discretize(sde, score_fn, x, t):
    """score_sde's ReverseSDE.discretize on its own grid (tables)."""
    f, G = sde.discretize(x, t, t, score_sde_tables=True)
    rev_f = f.to(x.dtype) - _col(G, x).to(x.dtype) ** 2 * score_fn(x, t)
    return rev_f, G.to(x.dtype)


def reverse_diffusion_predictor(sde, score_fn, x, t):
    f, G = _rsde_discretize(sde, score_fn, x, t)
    z = torch.randn_like(x)
    x_mean = x - f
    x = x_mean + _col(G, x) * z
    return x, x_mean


def euler_maruyama_predictor(sde, score_fn, x, t):
    dt = -1.0 / sde.N
    z = torch.randn_like(x)
    drift, diffusion = _rsde(sde, score_fn, x, t)
    x_mean = x + drift * dt
    x = x_mean + _col(diffusion, x) * (-dt) ** 0.5 * z
    return x, x_mean


def langevin_corrector(sde, score_fn, x, t, snr, n_steps):
    if hasattr(sde, "alphas"):
        timestep = (t * (sde.N - 1) / sde.T).long()
        alpha = sde.alphas.to(t.device)[timestep].to(x.dtype)
    else:
        alpha = torch.ones_like(t, dtype=x.dtype)
    x_mean = x
    for _ in range(n_steps):
        grad = score_fn(x, t)
        noise = torch.randn_like(x)
        grad_norm = torch.norm(grad.reshape(grad.shape[0], -1), dim=-1).mean()
        noise_norm = torch.norm(noise.reshape(noise.shape[0], -1), dim=-1).mean()
        step_size = (snr * noise_norm / grad_norm) ** 2 * 2 * alpha
        x_mean = x + _col(step_size, x) * grad
        x = x_mean + _col(torch.sqrt(step_size * 2), x) * noise
    return x, x_mean


@torch.no_grad()
def pc_sampler(score_fn, sde, shape, *, snr=0.16, n_steps=1, predictor="reverse_diffusion", eps=None, device="cpu"):
    """score_sde's get_pc_sampler(...)(model) with denoise=True; N = sde.N steps."""
    eps = sde.eps if eps is None else eps
    x = sde.prior_sampling(shape, seed=0, device=device)
    timesteps = torch.linspace(sde.T, eps, sde.N, device=device)  # float32, as score_sde
    x_mean = x
    for i in range(sde.N):
        vec_t = torch.ones(shape[0], device=device) * timesteps[i]
        x, x_mean = langevin_corrector(sde, score_fn, x, vec_t, snr, n_steps) if n_steps else (x, x)
        if predictor == "reverse_diffusion":
            x, x_mean = reverse_diffusion_predictor(sde, score_fn, x, vec_t)
        else:
            x, x_mean = euler_maruyama_predictor(sde, score_fn, x, vec_t)
    return x_mean


def ancestral_predictor(sde, score_fn, x, t):
    """score_sde's AncestralSamplingPredictor (VP branch)."""
    timestep = (t * (sde.N - 1) / sde.T).long()
    beta = sde.discrete_betas.to(t.device)[timestep].to(x.dtype)
    score = score_fn(x, t)
    x_mean = (x + _col(beta, x) * score) / _col(torch.sqrt(1.0 - beta), x)
    noise = torch.randn_like(x)
    x = x_mean + _col(torch.sqrt(beta), x) * noise
    return x, x_mean


@torch.no_grad()
def predictor_sampler(score_fn, sde, shape, predictor, *, probability_flow=False, eps=None, device="cpu"):
    """score_sde's get_pc_sampler with the NoneCorrector: N = sde.N predictor steps, x_mean returned."""
    eps = sde.eps if eps is None else eps
    x = sde.prior_sampling(shape, seed=0, device=device)
    timesteps = torch.linspace(sde.T, eps, sde.N, device=device)
    x_mean = x
    for i in range(sde.N):
        vec_t = torch.ones(shape[0], device=device) * timesteps[i]
        if predictor == "ancestral":
            x, x_mean = ancestral_predictor(sde, score_fn, x, vec_t)
        else:  # EulerMaruyamaPredictor(probability_flow=True): the reverse ODE, no noise
            dt = -1.0 / sde.N
            drift, _ = _rsde(sde, score_fn, x, vec_t, probability_flow=probability_flow)
            x_mean = x + drift * dt
            x = x_mean
    return x_mean


@torch.no_grad()
def ode_sampler(score_fn, sde, shape, *, rtol=1e-3, atol=1e-3, eps=None, device="cpu"):
    """score_sde's get_ode_sampler: scipy RK45 on the probability-flow ODE with a host round trip per
    evaluation, then the denoising reverse-diffusion step at eps.  Returns (x, nfe)."""
    import numpy as np
    from scipy import integrate

    eps = sde.eps if eps is None else eps
    x = sde.prior_sampling(shape, seed=0, device=device)

    def ode_func(t, y):
        x_t = torch.from_numpy(y.reshape(shape)).to(device).float()
        vec_t = torch.ones(shape[0], device=device) * t
        drift, _ = _rsde(sde, score_fn, x_t, vec_t, probability_flow=True)
        return drift.detach().cpu().numpy().reshape((-1,)).astype(np.float64)

    solution = integrate.solve_ivp(
        ode_func, (sde.T, eps), x.detach().cpu().numpy().reshape((-1,)), rtol=rtol, atol=atol, method="RK45"
    )
    x = torch.tensor(solution.y[:, -1]).reshape(shape).to(device).float()
    vec_eps = torch.ones(shape[0], device=device) * eps
    _, x = reverse_diffusion_predictor(sde, score_fn, x, vec_eps)
    return x, solution.nfev + 1


def likelihood(
    score_fn,
    sde,
    data,
    *,
    rtol=1e-5,
    atol=1e-5,
    eps=1e-5,
    hutchinson_type="Rademacher",
    prior_logp=None,
    epsilon=None,
):
    """score_sde's get_likelihood_fn: scipy RK45 from eps to T on [x, delta log p] with a host round
    trip per evaluation; drift_fn and div_fn each call the model (two forwards per evaluation, as
    there); the Hutchinson probe is drawn once (torch RNG), or is ``epsilon`` when given (the one
    change to the loop: a race can hand both sides the same probe, so both estimate the same
    integral and their errors compare).  Returns (nll [B] nats, nfe)."""
    import numpy as np
    from scipy import integrate

    shape = data.shape
    if epsilon is not None:
        pass
    elif hutchinson_type == "Gaussian":
        epsilon = torch.randn_like(data)
    else:
        epsilon = torch.randint_like(data, low=0, high=2).float() * 2 - 1.0

    def drift_fn(x, t):
        return _rsde(sde, score_fn, x, t, probability_flow=True)[0]

    def div_fn(x, t, eps_):
        with torch.enable_grad():
            x.requires_grad_(True)
            fn_eps = torch.sum(drift_fn(x, t) * eps_)
            grad_fn_eps = torch.autograd.grad(fn_eps, x)[0]
        x.requires_grad_(False)
        return torch.sum(grad_fn_eps * eps_, dim=tuple(range(1, len(x.shape))))

    def ode_func(t, x):
        sample = torch.from_numpy(x[: -shape[0]].reshape(shape)).to(data.device).type(torch.float32)
        vec_t = torch.ones(sample.shape[0], device=sample.device) * t
        drift = drift_fn(sample, vec_t).detach().cpu().numpy().reshape((-1,))
        logp_grad = div_fn(sample, vec_t, epsilon).detach().cpu().numpy().reshape((-1,))
        return np.concatenate([drift, logp_grad], axis=0)

    with torch.no_grad():
        init = np.concatenate([data.detach().cpu().numpy().reshape((-1,)), np.zeros((shape[0],))], axis=0)
        solution = integrate.solve_ivp(ode_func, (eps, sde.T), init, rtol=rtol, atol=atol, method="RK45")
        zp = solution.y[:, -1]
        z = torch.from_numpy(zp[: -shape[0]].reshape(shape)).to(data.device).type(torch.float32)
        delta_logp = torch.from_numpy(zp[-shape[0] :].reshape((shape[0],))).to(data.device)
        prior = prior_logp(z) if prior_logp is not None else sde.prior_logp(z)
        return -(prior.double() + delta_logp), solution.nfev
