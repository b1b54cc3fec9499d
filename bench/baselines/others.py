"""Eager copies of the remaining peers' loops: diffusers' DDIM step and NCSN's Langevin dynamics."""

from __future__ import annotations

import torch

from bench.baselines import _col


@torch.no_grad()
def ddim(score_fn, sde, x, times):
    """diffusers' DDIMScheduler.step (eta = 0) written as its loop over ``times`` (then the data end),
    with epsilon = -std * score."""
    for i, t in enumerate(times):
        t_vec = torch.full((x.shape[0],), float(t))
        abar_t = _col(sde.alpha_bar(t_vec.double()).float(), x)
        if i + 1 < len(times):
            abar_prev = _col(sde.alpha_bar(torch.full_like(t_vec, float(times[i + 1])).double()).float(), x)
        else:
            abar_prev = torch.ones_like(abar_t)
        eps = -torch.sqrt(1 - abar_t) * score_fn(x, t_vec)
        pred_x0 = (x - torch.sqrt(1 - abar_t) * eps) / torch.sqrt(abar_t)
        x = torch.sqrt(abar_prev) * pred_x0 + torch.sqrt(1 - abar_prev) * eps
    return x


@torch.no_grad()
def anneal_langevin_dynamics(score_fn, x, sigmas, n_steps_each=100, step_lr=2e-5):
    """NCSN's anneal_Langevin_dynamics (Song & Ermon 2019), score_fn(x, sigma [B])."""
    for sigma in sigmas:
        labels = torch.full((x.shape[0],), float(sigma))
        step_size = step_lr * (float(sigma) / float(sigmas[-1])) ** 2
        for _ in range(n_steps_each):
            noise = torch.randn_like(x) * (step_size * 2) ** 0.5
            grad = score_fn(x, labels)
            x = x + step_size * grad + noise
    return x


@torch.no_grad()
def langevin_dynamics(score_fn, x, t, n_steps, step_size):
    """Plain unadjusted Langevin: x + eps s + sqrt(2 eps) z."""
    t_vec = torch.full((x.shape[0],), float(t))
    for _ in range(n_steps):
        x = x + step_size * score_fn(x, t_vec) + (2 * step_size) ** 0.5 * torch.randn_like(x)
    return x
