"""Matplotlib figures for TensorBoard; matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def tensorboard_writer(loggers: Iterable[Any]) -> Any | None:
    """The SummaryWriter of the first TensorBoard logger, or None when the run has none."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix(confusion: torch.Tensor) -> Any:
    """Counts in each cell, colour by row-normalized rate, so rare classes stay readable."""
    plt = _pyplot()
    counts = confusion.numpy()
    rates = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
    size = max(4.0, 0.5 * len(counts))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (row, col), count in zip(((r, c) for r in range(len(counts)) for c in range(len(counts))), counts.flat):
        ax.text(
            col,
            row,
            str(count),
            ha="center",
            va="center",
            color="white" if rates[row, col] > 0.5 else "black",
            fontsize=8,
        )
    ax.set(xlabel="predicted", ylabel="true", xticks=range(len(counts)), yticks=range(len(counts)))
    fig.tight_layout()
    return fig


def sample_grid(x: torch.Tensor, y: torch.Tensor, preds: torch.Tensor, columns: int = 8) -> Any:
    """Images (C, H, W) are shown as pictures, 1-D signals (C, L) as line plots; titles read true→predicted."""
    plt = _pyplot()
    rows = -(-len(x) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, sample, true, pred in zip(axes.flat, x.float(), y.tolist(), preds.tolist()):
        if sample.ndim == 3:
            image = sample.permute(1, 2, 0).squeeze(-1)
            lo, hi = image.min(), image.max()
            ax.imshow(((image - lo) / (hi - lo + 1e-8)).numpy(), cmap="gray" if image.ndim == 2 else None)
        else:
            ax.plot(sample.reshape(sample.shape[0], -1).T.numpy(), linewidth=1)
        ax.set_title(f"{true}→{pred}", fontsize=8)
    fig.tight_layout()
    return fig
