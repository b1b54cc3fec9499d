"""``fit``: the ``scorefast train`` loop — checkpoints, loss curve, sample grid, exact resume.

``out_dir`` holds ``train_state.safetensors`` (everything to resume: model, optimizer, EMA, step,
the loss history and the losses of the log window in progress), ``model.safetensors`` (the EMA
weights as a ``sf.models`` checkpoint, for ``scorefast sample --model PATH``), ``loss.png``,
``summary.json`` and ``samples.png``, each written atomically.  State is written every
``save_every`` steps and when the loop stops for any reason (an error, Ctrl-C), so no finished
step is lost; a rerun with the same settings continues from the last saved step, and its loss
history, ``loss.png`` and ``final_loss`` equal an uninterrupted run's.  A rerun with another
setting is refused, naming it, and a directory another training is using is refused too (a lock).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .. import _checks, models
from .._io import atomic_path, atomic_savefig, atomic_write_text, dir_lock, writable_dir
from ..distributed import resolve_device
from ..sde import SDE, VPSDE, RectifiedFlow
from . import data as datasets
from .ema import EMA
from .state import read_metadata
from .step import STATE_VERSION, TrainStep

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


def _plot_losses(curve: list[list[float]], path: Path, loss: str = "dsm") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if curve:
        steps, values = zip(*curve)
        ax.plot(steps, values, lw=0.8)
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{loss.upper()} loss (mean over logged window)")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


def _restore_log(extra: dict, path: Path) -> tuple[list[list[float]], list[float]]:
    """(history, losses of the unfinished log window) saved with a state."""
    history, window = extra.get("history", []), extra.get("window", [])
    pairs = isinstance(history, list) and all(isinstance(h, list) and len(h) == 2 for h in history)
    if not pairs or not isinstance(window, list):
        raise ValueError(f"out_dir: {path}: its loss history is damaged")
    return history, window


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

    The loss history holds the mean loss of every ``log_every`` steps, at steps that are multiples
    of it; ``final_loss`` (and the last point of ``loss.png``) is the mean of the window in progress
    when the run stops, or the last logged mean.  Every setting is checked before ``out_dir`` is
    touched.

    ``sde``: an SDE, or a name in ``SDES`` (default VP): eps-prediction DSM, or on RectifiedFlow a
    velocity network trained by flow matching (loss "fm")."""
    for name, value in (("steps", steps), ("batch", batch), ("save_every", save_every), ("log_every", log_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
    if data not in datasets.DATASETS:
        raise ValueError(f"data: expected one of {', '.join(datasets.DATASETS)}, got {data!r}")
    lr = _checks.check_finite_scalar("lr", lr, positive=True)
    _checks.check_counter("seed", seed, torch.device("cpu"), upper=_checks.UINT64)
    device = resolve_device(device if device is not None else "cpu")
    if isinstance(sde, str):
        if sde not in SDES:
            raise ValueError(f"sde: expected one of {', '.join(SDES)}, got {sde!r}")
        sde = SDES[sde]()
    sde = sde if sde is not None else VPSDE()
    loss_name = "fm" if isinstance(sde, RectifiedFlow) else "dsm"
    with torch.random.fork_rng(devices=[]):  # the initial weights from `seed`, the caller's RNG untouched
        torch.manual_seed(seed)
        model = make_model(data)
    model = model.to(device)
    step = TrainStep(  # checks precision, grad_clip, warmup, seed, and the EMA its decay and warmup
        model,
        torch.optim.Adam(model.parameters(), lr=lr),
        loss_name,
        sde=sde,
        precision=precision,
        grad_clip=grad_clip,
        ema=EMA(model, decay=ema_decay, warmup=ema_warmup),
        warmup=warmup,
        seed=seed,
    )
    train_data = datasets.load(data).to(device)
    settings = {
        "data": data,
        "batch": batch,
        "lr": lr,
        "grad_clip": grad_clip,
        "ema_decay": ema_decay,
        "ema_warmup": ema_warmup,
        "log_every": log_every,
        "sde": type(sde).__name__,
    }
    out = writable_dir(out_dir, "out_dir")  # the first write: every setting is valid
    with dir_lock(out, "out_dir"):
        return _train(out, step, train_data, settings, seed, steps, save_every, progress, sample_grid)


def _train(out: Path, step: TrainStep, train_data, settings: dict, seed, steps, save_every, progress, sample_grid):
    """``fit``'s loop, in the locked ``out``: resume, train to ``steps``, save, summarise."""
    data, batch, log_every = settings["data"], settings["batch"], settings["log_every"]
    history: list[list[float]] = []  # [step, mean loss of the log_every steps up to it]
    window: list[float] = []  # losses since the last logged step
    state_path = out / STATE_FILE
    if state_path.exists():
        saved = read_metadata(state_path, "scorefast_train", STATE_VERSION).get("extra", {}).get("settings")
        if not isinstance(saved, dict):
            raise ValueError(f"out_dir: {state_path} records no training settings; use another out_dir")
        for key, value in settings.items():
            if key in saved and saved[key] != value:  # a key an older state did not record is not checked
                raise ValueError(
                    f"{key}: {out} was trained with {saved.get(key)!r}, this run has {value!r} "
                    "(use another out_dir, or the original settings to resume)"
                )
        history, window = _restore_log(step.load(state_path), state_path)
    start_step, t0 = step.step, time.perf_counter()
    saved_at = start_step
    shape = tuple(train_data.shape[1:])
    device = train_data.device

    def curve() -> list[list[float]]:
        return history + ([[step.step, sum(window) / len(window)]] if window else [])

    def save() -> None:
        nonlocal saved_at
        saved_at = step.step
        step.save(state_path, extra={"history": history, "window": window, "settings": settings})
        with step.ema.swap():
            models.save(
                out / MODEL_FILE,
                step.model,
                sde=step.sde,
                shape=shape,
                parameterisation=step.parameterisation,
                data_range=(-1.0, 1.0),
                extra={"trained_steps": step.step, "data": data},
            )
        _plot_losses(curve(), out / "loss.png", step.loss_name)

    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=min(start_step, steps), disable=not progress, desc=f"train {data}", unit="step")
    try:
        while step.step < steps:
            idx = datasets.batch_indices(len(train_data), batch, seed=seed, step=step.step)
            window.append(float(step(train_data[idx.to(device)])))
            if step.step % log_every == 0:
                history.append([step.step, sum(window) / len(window)])
                window = []
                bar.set_postfix(loss=f"{history[-1][1]:.4f}")
            if step.step % save_every == 0:
                save()
            bar.update(1)
    finally:
        bar.close()
        if step.step > saved_at:
            save()
    if not (out / "loss.png").exists():
        _plot_losses(curve(), out / "loss.png", step.loss_name)
    final = curve()
    summary = {
        "data": data,
        "steps": step.step,
        "resumed_from": start_step,
        "seconds": time.perf_counter() - t0,
        "final_loss": final[-1][1] if final else math.nan,
        "parameters": sum(p.numel() for p in step.model.parameters()),
    }
    if sample_grid:
        summary["samples_png"] = str(write_samples(out / MODEL_FILE, out / "samples.png", seed=seed, device=device))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
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
    with atomic_path(path) as tmp:
        save_samples_png(x, tmp, title=f"{Path(checkpoint).name}: {sampler}")
    return Path(path)
