"""Eager copies of score_sde's training-loop pieces (Song et al. 2021, score_sde_pytorch), for racing.

Kept faithful to the original structure: ``losses.get_sde_loss_fn`` (continuous times, no likelihood
weighting, per-sample ``0.5 * sum`` over elements when ``reduce_mean=False``), ``models.utils
.get_model_fn`` / ``get_score_fn``'s VP branch (``model.train()`` then the network on ``t * 999``,
score = -output / std),
``losses.optimization_manager`` (linear lr warmup, ``clip_grad_norm_``, ``optimizer.step``),
``losses.get_step_fn``'s training step and ``models.ema.ExponentialMovingAverage`` (a Python loop
over the parameters, three eager ops each).  Noise and times come from ``torch.randn_like`` /
``torch.rand``; the VP SDE's ``marginal_prob`` is score_sde's fp32 arithmetic.
"""

from __future__ import annotations

import torch


class VPSDE:
    """score_sde's ``sde_lib.VPSDE`` as far as training uses it (``T``, ``marginal_prob``)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        self.beta_0, self.beta_1, self.N = beta_min, beta_max, N
        self.T = 1.0

    def marginal_prob(self, x, t):
        log_mean_coeff = -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0
        mean = torch.exp(log_mean_coeff).reshape(-1, *([1] * (x.dim() - 1))) * x
        std = torch.sqrt(1.0 - torch.exp(2.0 * log_mean_coeff))
        return mean, std


def get_model_fn(model):
    """``models.utils.get_model_fn(model, train=True)``: the model in training mode, then called."""

    def model_fn(x, labels):
        model.train()
        return model(x, labels)

    return model_fn


def get_score_fn(sde: VPSDE, model):
    """``models.utils.get_score_fn`` for a continuous VP SDE: score = -model(x, 999 t) / std."""
    model_fn = get_model_fn(model)

    def score_fn(x, t):
        labels = t * 999
        score = model_fn(x, labels)
        std = sde.marginal_prob(torch.zeros_like(x), t)[1]
        return -score / std.reshape(-1, *([1] * (x.dim() - 1)))

    return score_fn


def get_sde_loss_fn(sde: VPSDE, *, reduce_mean: bool = False, eps: float = 1e-5):
    """``losses.get_sde_loss_fn(sde, train=True, reduce_mean, continuous=True, likelihood_weighting=False)``."""
    reduce_op = torch.mean if reduce_mean else lambda *args, **kwargs: 0.5 * torch.sum(*args, **kwargs)

    def loss_fn(model, batch):
        score_fn = get_score_fn(sde, model)
        t = torch.rand(batch.shape[0], device=batch.device) * (sde.T - eps) + eps
        z = torch.randn_like(batch)
        mean, std = sde.marginal_prob(batch, t)
        col = std.reshape(-1, *([1] * (batch.dim() - 1)))
        perturbed_data = mean + col * z
        score = score_fn(perturbed_data, t)
        losses = torch.square(score * col + z)
        losses = reduce_op(losses.reshape(losses.shape[0], -1), dim=-1)
        return torch.mean(losses)

    return loss_fn


def optimization_manager(*, lr: float, warmup: int, grad_clip: float):
    """``losses.optimization_manager``: warmup lr * min(step / warmup, 1), clip (if >= 0), step."""

    def optimize_fn(optimizer, params, step):
        if warmup > 0:
            for g in optimizer.param_groups:
                g["lr"] = lr * min(step / warmup, 1.0)
        if grad_clip >= 0:
            torch.nn.utils.clip_grad_norm_(params, max_norm=grad_clip)
        optimizer.step()

    return optimize_fn


class ExponentialMovingAverage:
    """``models.ema.ExponentialMovingAverage`` (use_num_updates=True): a loop over the parameters."""

    def __init__(self, parameters, decay: float):
        if decay < 0.0 or decay > 1.0:
            raise ValueError("Decay must be between 0 and 1")
        self.decay = decay
        self.num_updates = 0
        self.shadow_params = [p.clone().detach() for p in parameters if p.requires_grad]

    def update(self, parameters):
        decay = self.decay
        self.num_updates += 1
        decay = min(decay, (1 + self.num_updates) / (10 + self.num_updates))
        one_minus_decay = 1.0 - decay
        with torch.no_grad():
            parameters = [p for p in parameters if p.requires_grad]
            for s_param, param in zip(self.shadow_params, parameters):
                s_param.sub_(one_minus_decay * (s_param - param))


def get_step_fn(sde: VPSDE, optimize_fn, *, reduce_mean: bool = False):
    """``losses.get_step_fn(sde, train=True, optimize_fn, continuous=True)``: state holds model,
    optimizer, ema and step; returns the batch's loss."""
    loss_fn = get_sde_loss_fn(sde, reduce_mean=reduce_mean)

    def step_fn(state, batch):
        model = state["model"]
        optimizer = state["optimizer"]
        optimizer.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        optimize_fn(optimizer, model.parameters(), step=state["step"])
        state["step"] += 1
        state["ema"].update(model.parameters())
        return loss

    return step_fn
