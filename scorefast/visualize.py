"""PNG output for samples (matplotlib, Agg): image grids for [B, C, H, W], scatters for [B, 2]."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(x: torch.Tensor, data_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """[B, C, H, W] -> one [H', W', C] image in [0, 1], ceil(sqrt(B)) columns, 1-pixel gaps."""
    lo, hi = data_range
    x = ((x.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    B, C, H, W = x.shape
    cols = math.ceil(math.sqrt(B))
    rows = math.ceil(B / cols)
    grid = torch.ones(C, rows * (H + 1) + 1, cols * (W + 1) + 1)
    for i in range(B):
        r, c = divmod(i, cols)
        grid[:, 1 + r * (H + 1) : 1 + r * (H + 1) + H, 1 + c * (W + 1) : 1 + c * (W + 1) + W] = x[i]
    return grid.permute(1, 2, 0)


def save_samples_png(
    x: torch.Tensor,
    path: str | Path,
    *,
    title: str = "",
    reference: torch.Tensor | None = None,
    data_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """Write samples x as a PNG: a grid of images, or a 2-D scatter (beside ``reference`` if given)."""
    plt = _pyplot()
    path = Path(path)
    if x.dim() == 4:
        grid = image_grid(x, data_range)
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(grid.squeeze(-1).numpy() if grid.shape[-1] == 1 else grid.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.axis("off")
        axes = [ax]
    elif x.dim() == 2 and x.shape[1] == 2:
        panels = [(x, "scorefast samples")] + ([(reference, "exact samples")] if reference is not None else [])
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), sharex=True, sharey=True, squeeze=False)
        axes = list(axes[0])
        for ax, (data, name) in zip(axes, panels):
            data = data.detach().float().cpu()
            ax.scatter(data[:, 0].numpy(), data[:, 1].numpy(), s=1, alpha=0.4)
            ax.set_title(name)
            ax.set_aspect("equal")
    else:
        raise ValueError(f"x: can draw [B, C, H, W] images or [B, 2] points, got {tuple(x.shape)}")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
