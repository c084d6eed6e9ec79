"""Figures for the command line (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["plot_panels", "plot_compare"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw(ax, x: torch.Tensor, title: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if x.dim() == 2:  # points
        x = x[:, :2].clamp(-2, 2)
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=1, alpha=0.5)
        ax.set_xlim(-1.6, 1.6)
        ax.set_ylim(-1.6, 1.6)
        ax.set_aspect("equal")
    else:  # images (N, C, H, W) in [-1, 1]: an 8 x 8 grid
        n = min(64, x.shape[0])
        cols = 8
        rows = (n + cols - 1) // cols
        imgs = ((x[:n].clamp(-1, 1) + 1) / 2).float()
        c, h, w = imgs.shape[1:]
        grid = torch.ones(c, rows * (h + 1), cols * (w + 1))
        for i in range(n):
            r, k = divmod(i, cols)
            grid[:, r * (h + 1): r * (h + 1) + h, k * (w + 1): k * (w + 1) + w] = imgs[i]
        img = grid.permute(1, 2, 0).numpy()
        ax.imshow(img[..., 0] if c == 1 else img, cmap="gray" if c == 1 else None, vmin=0, vmax=1)


def plot_panels(panels: list[tuple[str, torch.Tensor]], path: str | Path) -> None:
    """One row of panels ``(title, samples)``; written to ``path``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, x) in zip(axes[0], panels):
        _draw(ax, x, title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_compare(data: torch.Tensor, panels: dict, steps_list, path: str | Path, title: str = "") -> None:
    """Rows: sampling step counts; columns: data, plain, SMD."""
    plt = _pyplot()
    rows = len(steps_list)
    fig, axes = plt.subplots(rows, 3, figsize=(9.6, 3.3 * rows), squeeze=False)
    n = next(iter(panels.values())).shape[0]
    for r, steps in enumerate(steps_list):
        _draw(axes[r][0], data[:n], "data")
        _draw(axes[r][1], panels[("plain", steps)], f"plain, {steps} steps")
        _draw(axes[r][2], panels[("SMD", steps)], f"SMD, {steps} steps")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
