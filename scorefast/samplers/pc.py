"""Predictor–corrector (score_sde's pc_sampler): per grid time, n_corrector Langevin corrector steps
x + eps s + sqrt(2 eps) z (snr 0.16) then one predictor step.

The corrector's alpha is score_sde's ``alphas[floor(t (N-1)/T)]`` for VP on its own grid,
abar(t_n)/abar(t_{n+1}) elsewhere and for sub-VP (t_N = 0), and 1 for VE/EDM.  Draws per step:
n_corrector + 1 (correctors first, then the predictor).

The corrector's step eps = 2 alpha (snr ||z|| / ||score||)^2 needs the norms of z and of the score;
``norm`` says whose:

- ``"sample"``: each sample's own (``sf.ops.snr_langevin_step``): batch-invariant, and close to
  score_sde's batch means when a sample has hundreds of elements (images);
- ``"batch"``: the batch means, as score_sde and diffusers do (for reproducing them): a sample's
  step then depends on the rest of its batch, so results change with the batch size;
- ``"expected"``: the norms' expectations, E||z||^2 = D and E||score||^2 = D / std(t)^2 (the Fisher
  information of the Gaussian noise of the perturbation, which bounds the score's), so
  eps = 2 alpha snr^2 std(t)^2: one fixed step per grid time, as NCSN's annealed Langevin
  (alpha_i proportional to sigma_i^2).  Batch-invariant and affine in x, and right for low-D data,
  where one sample's ||z|| and ||score|| are too noisy to set a step (a sample near a mode has
  ||score|| ~ 0 and gets a huge step);
- ``"auto"`` (default): ``"expected"`` for samples of fewer than ``AUTO_MIN_ELEMENTS`` (256)
  elements, ``"sample"`` otherwise.  Both are batch-invariant, so ``scorefast sample --batch 64``
  and ``--batch 32`` give the same samples.

Sliced W2 to exact samples (``sf.testing.sliced_wasserstein``, 4000 samples; one CPU run each)
on 2-D rings at 1000 / 2000 steps, by corrector norms:

    ring, SDE                              sample          batch           expected        floor
    built-in 8 modes r 4 (gmm2d), VPSDE    10.96 / 15.00   0.153 / 0.068   0.072 / 0.096   0.105
    built-in 8 modes r 4, VESDE(0.01, 10)   7.22 / 6.65    0.094 / 0.091   0.092 / 0.106   0.105
    4 modes r 3 (the tests'), VPSDE         2.09 / 2.89    0.127 / 0.100   0.101 / 0.103   0.085
    4 modes r 3, VESDE(0.01, 10)            2.10 / 2.69    0.107 / 0.093   0.099 / 0.097   0.085
"""

from __future__ import annotations

import torch

from .._checks import check_bool, check_choice, check_finite_scalar, check_int
from ..ops import snr_langevin_step
from ..rng import STREAM_SAMPLER
from ..sde import VPSDE, DiscreteVP
from . import euler_maruyama, reverse_diffusion
from .base import Context, Step

NAME = "pc"
DEFAULT_STEPS = 1000
KIND = "sde"
PREDICTORS = ("reverse_diffusion", "euler_maruyama", "none")
NORMS = ("auto", "sample", "batch", "expected")
_UNIT_SNR = 0.5**0.5
AUTO_MIN_ELEMENTS = 256  # "auto": per-sample norms from this many elements per sample, else "expected"


def draws(n_corrector: int = 1, **_) -> int:
    return n_corrector + 1


DRAWS = draws


def corrector_alpha(ctx: Context, t, t_next):
    sde = ctx.sde
    if isinstance(sde, VPSDE):
        return sde.corrector_alpha(t, t_next, score_sde_tables=ctx.score_sde_tables)
    if isinstance(sde, DiscreteVP):  # the last step's t_next is the data end (abar = 1), not DiscreteVP's t = 0
        return sde.alpha_bar(t) / ctx.next_coefs()[0] ** 2
    return torch.ones_like(t)


def validate(sde, *, snr, n_corrector, predictor, norm, denoise) -> dict:
    return {
        "snr": check_finite_scalar("snr", snr, positive=True),
        "n_corrector": check_int("n_corrector", n_corrector, minimum=0),
        "predictor": check_choice("predictor", predictor, PREDICTORS),
        "norm": check_choice("norm", norm, NORMS),
        "denoise": check_bool("denoise", denoise),
    }


def resolved_norm(norm: str, x) -> str:
    """ "auto" -> "expected" for samples of fewer than AUTO_MIN_ELEMENTS elements, else "sample"."""
    if norm != "auto":
        return norm
    return "sample" if x[0].numel() >= AUTO_MIN_ELEMENTS else "expected"


def run(
    ctx: Context,
    x,
    *,
    snr: float = 0.16,
    n_corrector: int = 1,
    predictor: str = "reverse_diffusion",
    norm: str = "auto",
    denoise: bool = True,
):
    norm = resolved_norm(norm, x)
    times, next_times = ctx.schedule_times()
    alpha_n = corrector_alpha(ctx, times, next_times)
    if norm == "expected":  # one fixed step per grid time: (eps, sqrt(2 eps)) with eps = 2 alpha snr^2 std^2
        eps = 2 * alpha_n * snr**2 * ctx.sde.std(times) ** 2
        alphas = ctx.table(torch.stack([eps, (2 * eps).sqrt()], 1))
    else:
        # the per-sample corrector's 2 alpha snr^2, folded in float64 (one fp32 rounding, in the table)
        alphas = ctx.table(2 * snr * snr * alpha_n if norm == "sample" else alpha_n)
    stepper = reverse_diffusion if predictor == "reverse_diffusion" else euler_maruyama
    sched = stepper.schedule(ctx) if predictor != "none" else None
    N = len(alphas)

    def step(n: Step, x, last: bool = False):
        t = ctx.time(n)
        for j in range(n_corrector):
            s = ctx.score(x, t)
            if norm == "expected":  # x + eps s + sqrt(2 eps) z: one launch
                x = ctx.update_row(x, alphas, n, [s], cols=(1.0, 0, 1), j=j)
                continue
            x = corrector(ctx, alphas, x, ctx.formed(s), n, j, snr, norm)
        if sched is not None:
            x = stepper.predictor_step(ctx, sched, x, ctx.score(x, t), n, n_corrector, last)
        return ctx.step_done(n, x, t)

    x = ctx.steps(step, x, 0, N - 1)
    return step(N - 1, x, last=denoise)


def corrector(ctx: Context, alphas, x, s, n: Step, j: int, snr: float, norm: str):
    """The SNR Langevin corrector with measured norms: ``norm="sample"`` is one launch of
    ``scorefast::snr_langevin_step`` reading 2 alpha snr^2 from the table at the step counter (and
    setting the run's flag); ``"batch"`` needs the batch means of the norms (a few ops of its own)."""
    common = dict(
        seed=ctx.seed_tensor(),
        stream=STREAM_SAMPLER,
        sample_ids=ctx.sample_ids,
        backend=ctx.backend_name(x),
        draws=ctx.draws,
        draw=j,
        flag=ctx.flag(x.device),
        _trusted=True,
    )
    if norm == "sample":
        table = alphas.packed((0,), torch.float64 if x.dtype == torch.float64 else torch.float32)
        # snr = sqrt(1/2): the kernel's constant 2 snr^2 is 1 in fp32, so eps = table[n] * |z|^2/|s|^2
        return snr_langevin_step(x, s, _UNIT_SNR, alpha=table[:, 0], norm=norm, row=ctx.row(n), **common)[0]
    alpha = alphas[n][0]
    return snr_langevin_step(x, s, snr, alpha=alpha, norm=norm, step=n, **common)[0]
