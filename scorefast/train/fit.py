"""``fit``: the ``scorefast train`` loop — checkpoints, loss curve, sample grid, exact resume.

``out_dir`` holds ``train_state.safetensors`` (everything to resume: model, optimizer, EMA, step,
loss history), ``model.safetensors`` (the EMA weights as a ``sf.models`` checkpoint, for
``scorefast sample --model PATH``), ``loss.png`` and ``samples.png``.  State is written every
``save_every`` steps and when the loop stops for any reason (an error, Ctrl-C), so no finished
step is lost; a rerun with the same settings continues from the last saved step.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .. import models
from .._io import writable_dir
from ..sde import SDE, VPSDE, RectifiedFlow
from . import data as datasets
from .ema import EMA
from .step import TrainStep

STATE_FILE, MODEL_FILE = "train_state.safetensors", "model.safetensors"
SDES = {"vp": VPSDE, "rectified_flow": RectifiedFlow}  # ``scorefast train --sde``: eps-DSM or flow matching

PRESETS = {
    # 8x8 digits: a 0.38M-parameter UNet, eps-prediction on score_sde's VP SDE
    "digits": {"arch": "UNet", "arch_kwargs": {"in_channels": 1, "ch": 32, "ch_mult": [1, 1], "num_res_blocks": 2}},
    "toy2d": {"arch": "MLP", "arch_kwargs": {"dim": 2, "hidden": 128, "layers": 3}},
}


def make_model(data: str) -> torch.nn.Module:
    preset = PRESETS[data]
    return models.build(preset["arch"], **preset["arch_kwargs"])


def _plot_losses(history: list[list[float]], path: Path, loss: str = "dsm") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if history:
        steps, values = zip(*history)
        ax.plot(steps, values, lw=0.8)
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{loss.upper()} loss (mean over logged window)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fit(
    out_dir: str | Path,
    *,
    data: str = "digits",
    steps: int = 6000,
    batch: int = 128,
    lr: float = 2e-3,
    warmup: int = 200,
    grad_clip: float = 1.0,
    ema_decay: float = 0.999,
    ema_warmup: int = 10,
    precision: str = "fp32",
    seed: int = 0,
    sde: SDE | str | None = None,
    save_every: int = 500,
    log_every: int = 50,
    device=None,
    progress: bool = False,
    sample_grid: bool = True,
) -> dict:
    """Train (or resume) a built-in model on a built-in data set; returns a summary dict.

    ``sde``: an SDE, or a name in ``SDES`` (default VP): eps-prediction DSM, or on RectifiedFlow a
    velocity network trained by flow matching (loss "fm")."""
    for name, value in (("steps", steps), ("batch", batch), ("save_every", save_every), ("log_every", log_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
    if isinstance(sde, str):
        if sde not in SDES:
            raise ValueError(f"sde: expected one of {', '.join(SDES)}, got {sde!r}")
        sde = SDES[sde]()
    sde = sde if sde is not None else VPSDE()
    loss_name, parameterisation = ("fm", "velocity") if isinstance(sde, RectifiedFlow) else ("dsm", "eps")
    out = writable_dir(out_dir, "out_dir")
    device = torch.device(device or "cpu")
    train_data = datasets.load(data).to(device)
    with torch.random.fork_rng(devices=[]):  # the initial weights from `seed`, the caller's RNG untouched
        torch.manual_seed(seed)
        model = make_model(data)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    step = TrainStep(
        model,
        optimizer,
        loss_name,
        sde=sde,
        precision=precision,
        grad_clip=grad_clip,
        ema=EMA(model, decay=ema_decay, warmup=ema_warmup),
        warmup=warmup,
        seed=seed,
    )
    history: list[list[float]] = []
    settings = {
        "data": data,
        "batch": batch,
        "lr": lr,
        "grad_clip": grad_clip,
        "ema_decay": ema_decay,
        "ema_warmup": ema_warmup,
    }
    state_path = out / STATE_FILE
    if state_path.exists():
        extra = step.load(state_path)
        for key, value in settings.items():
            if extra.get("settings", {}).get(key) != value:
                raise ValueError(
                    f"{key}: {out} was trained with {extra['settings'].get(key)!r}, this run has {value!r}"
                )
        history = extra.get("history", [])
    start_step, window, t0 = step.step, [], time.perf_counter()
    saved_at = start_step
    shape = tuple(train_data.shape[1:])

    def save() -> None:
        nonlocal saved_at
        saved_at = step.step
        step.save(state_path, extra={"history": history, "settings": settings})
        with step.ema.swap():
            models.save(
                out / MODEL_FILE,
                model,
                sde=sde,
                shape=shape,
                parameterisation=parameterisation,
                data_range=(-1.0, 1.0),
                extra={"trained_steps": step.step, "data": data},
            )
        _plot_losses(history, out / "loss.png", loss_name)

    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=start_step, disable=not progress, desc=f"train {data}", unit="step")
    try:
        while step.step < steps:
            idx = datasets.batch_indices(len(train_data), batch, seed=seed, step=step.step)
            loss = step(train_data[idx.to(device)])
            window.append(float(loss))
            if len(window) == log_every or step.step == steps:
                history.append([step.step, sum(window) / len(window)])
                bar.set_postfix(loss=f"{history[-1][1]:.4f}")
                window = []
            if step.step % save_every == 0:
                save()
            bar.update(1)
    finally:
        bar.close()
        if step.step > saved_at:
            save()
    summary = {
        "data": data,
        "steps": step.step,
        "resumed_from": start_step,
        "seconds": time.perf_counter() - t0,
        "final_loss": history[-1][1] if history else math.nan,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if sample_grid:
        summary["samples_png"] = str(write_samples(out / MODEL_FILE, out / "samples.png", seed=seed, device=device))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def write_samples(
    checkpoint: Path,
    path: Path,
    *,
    n: int | None = None,
    seed: int = 0,
    sampler: str = "ddim",
    steps: int = 50,
    device=None,
) -> Path:
    """Sample a checkpoint and save a PNG: 64 images as a grid, or 2000 2-D points as a scatter."""
    from ..sampling import sample
    from ..visualize import save_samples_png

    score_fn, sde, shape = models.load(checkpoint, device=device)
    n = n or (64 if len(shape) == 3 else 2000)
    with torch.no_grad():
        x = sample(score_fn, sde, (n, *shape), sampler=sampler, steps=steps, seed=seed, device=device)
    save_samples_png(x, path, title=f"{Path(checkpoint).name}: {sampler}")
    return path
