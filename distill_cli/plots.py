"""Figures for reports: matplotlib with the Agg backend and its bundled font (nothing is downloaded)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Draw = TypeVar("Draw", bound=Callable[..., Path])


def plain_text(draw: Draw) -> Draw:
    """Labels are drawn as given: a class, term or file name with ``$...$`` in it is no TeX (matplotlib's math
    parser would fail on it, or change it)."""

    @functools.wraps(draw)
    def drawn(*args, **kwargs):
        with plt.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return drawn  # type: ignore[return-value]


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@plain_text
def loss_curves(steps: list[int], series: dict[str, list[float]], path: Path) -> Path:
    """Two panels: raw values (detection items and unweighted terms), and what enters the total (weighted)."""
    fig, (raw, weighted) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, values in series.items():
        axis = weighted if name.endswith("_w") or name in ("det_loss", "distill_loss") else raw
        axis.plot(steps, values, label=name)
    for axis, title in ((raw, "raw terms"), (weighted, "weighted: total = det_loss + distill_loss")):
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    return _save(fig, path)


@plain_text
def metric_curves(epochs: list[int], metrics: dict[str, list[float]], teacher: dict[str, float], path: Path) -> Path:
    fig, axis = plt.subplots(figsize=(7, 4.5))
    for index, (name, values) in enumerate(metrics.items()):
        color = f"C{index}"
        axis.plot(epochs, values, marker="o", color=color, label=f"student {name}")
        if name in teacher:
            axis.axhline(teacher[name], color=color, linestyle="--", label=f"teacher {name}")
    axis.set_xlabel("epoch")
    axis.set_ylabel("mAP")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return _save(fig, path)


@plain_text
def schedules(steps: np.ndarray, weights: dict[str, np.ndarray], steps_per_epoch: int, path: Path) -> Path:
    fig, axis = plt.subplots(figsize=(7, 4))
    for name, values in weights.items():
        axis.plot(steps / max(steps_per_epoch, 1), values, label=name)
    axis.set_xlabel("epoch")
    axis.set_ylabel("weight")
    axis.set_title("distillation weights")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return _save(fig, path)


@plain_text
def grouped_bars(groups: list[str], series: dict[str, list[float]], ylabel: str, title: str, path: Path) -> Path:
    fig, axis = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(series)) / 2), 4.5))
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for index, (name, values) in enumerate(series.items()):
        axis.bar(x + index * width - 0.4 + width / 2, values, width, label=name)
    axis.set_xticks(x, groups, rotation=20, ha="right", fontsize=8)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3, axis="y")
    return _save(fig, path)


@plain_text
def pr_curves(curves: dict[str, tuple[list[float], list[float]]], path: Path) -> Path:
    fig, axis = plt.subplots(figsize=(6, 5))
    for name, (recall, precision) in curves.items():
        axis.plot(recall, precision, label=name)
    axis.set_xlabel("recall")
    axis.set_ylabel("precision (mean over classes, IoU 0.5)")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return _save(fig, path)


@plain_text
def image_grid(rows: list[list[np.ndarray]], titles: list[str], path: Path) -> Path:
    """rows of RGB images (one row per sample image, one column per model); ``titles`` name the columns."""
    cols = len(titles)
    fig, axes = plt.subplots(len(rows), cols, figsize=(3 * cols, 3 * len(rows)), squeeze=False)
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            axes[r][c].imshow(image)
            axes[r][c].axis("off")
            if r == 0:
                axes[r][c].set_title(titles[c], fontsize=8)
    return _save(fig, path)
