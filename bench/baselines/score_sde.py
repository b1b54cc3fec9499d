"""Eager PyTorch copies of score_sde's sampling loops (Song et al. 2021, sampling.py), for racing.

Kept faithful to the original structure: per-step predictor and corrector objects calling the
reverse SDE, noise from torch.randn_like, batch-mean norms in the Langevin corrector, x_mean
returned at the end (denoise=True).  Only the model call is abstracted to score_fn(x, t).
"""

from __future__ import annotations

import torch


def _rsde(sde, score_fn, x, t, probability_flow=False):
    """score_sde's ReverseSDE.sde: drift f - g^2 s (x 0.5 for the probability flow), diffusion g."""
    drift, diffusion = sde.sde(x, t)
    score = score_fn(x, t)
    drift = drift - diffusion[:, None] ** 2 * score * (0.5 if probability_flow else 1.0)
    return drift, diffusion


def _rsde_discretize(sde, score_fn, x, t):
    """score_sde's ReverseSDE.discretize on its own grid (tables)."""
    f, G = sde.discretize(x, t, t, score_sde_tables=True)
    rev_f = f.to(x.dtype) - G[:, None].to(x.dtype) ** 2 * score_fn(x, t)
    return rev_f, G.to(x.dtype)


def reverse_diffusion_predictor(sde, score_fn, x, t):
    f, G = _rsde_discretize(sde, score_fn, x, t)
    z = torch.randn_like(x)
    x_mean = x - f
    x = x_mean + G[:, None] * z
    return x, x_mean


def euler_maruyama_predictor(sde, score_fn, x, t):
    dt = -1.0 / sde.N
    z = torch.randn_like(x)
    drift, diffusion = _rsde(sde, score_fn, x, t)
    x_mean = x + drift * dt
    x = x_mean + diffusion[:, None] * (-dt) ** 0.5 * z
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
        x_mean = x + step_size[:, None] * grad
        x = x_mean + torch.sqrt(step_size * 2)[:, None] * noise
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
