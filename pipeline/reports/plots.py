"""PNG figures for reports: confusion matrices (and, for exports, grids of mistakes).

Figures are drawn on `matplotlib.figure.Figure` objects directly, never through pyplot: no backend
is chosen or needed (saving a PNG renders with Agg), and no figure outlives the function that drew it.
Class names come from folder names and exports, anyone's: they are drawn as they are (`_literal_text`), less
their control characters (`_drawable`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from pipeline.infra.text import printable

ANNOTATED_CLASSES = 30  # beyond this many classes (CIFAR-100) the cells are too small for their counts
MAX_FIGURE_INCHES = 24.0  # 2400 px at 100 dpi


def _literal_text(draw):
    """Run `draw` with every text drawn as written: `$` starts no mathtext (a class named "price_$5_to_$10" would
    raise) and no user's matplotlibrc sends labels through LaTeX. Set for the whole drawing, saving included:
    tick labels are made while the figure renders, and they take these settings when they are made."""
    @functools.wraps(draw)
    def drawn(*args, **kwargs):
        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            return draw(*args, **kwargs)
    return drawn


def _drawable(classes: Sequence[str]) -> list[str]:
    """Class names as labels, one line each: a control character is drawn as a missing glyph, with a warning that
    carries the character itself (an ESC, say) to the terminal."""
    return [printable(name, one_line=True) for name in classes]


def confusion_counts(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels.astype(np.int64), predicted.astype(np.int64)), 1)
    return counts


@_literal_text
def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: Sequence[str], path: Path,
                     title: str) -> np.ndarray:
    """Write the confusion matrix (counts, rows = true class) as a PNG; return the counts."""
    counts = confusion_counts(labels, predicted, len(classes))
    classes = _drawable(classes)
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    many = len(classes) > ANNOTATED_CLASSES
    size = min(max(5.0, 0.55 * len(classes) + 2), MAX_FIGURE_INCHES)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ax.imshow(counts, cmap="Blues")
    for (row, col), n in np.ndenumerate(counts):
        if n and not many:  # many classes: the colour alone
            ax.text(col, row, str(n), ha="center", va="center", fontsize=8,
                    color="white" if n > counts.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=90 if many else 45, ha="center" if many else "right",
                  fontsize=5 if many else None)
    ax.set_yticks(range(len(classes)), classes, fontsize=5 if many else None)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} (accuracy {accuracy:.4f}, {counts.sum():,} images)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return counts


def _displayable(image: np.ndarray) -> np.ndarray:
    """One uint8 image as imshow takes it: [H, W] for gray, [H, W, 3] for RGB (from [H, W], [1, H, W], [3, H, W])."""
    if image.ndim == 3:
        image = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    return image


@_literal_text
def mistakes_grid(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, confidence: np.ndarray,
                  classes: Sequence[str], path: Path, title: str, limit: int = 36) -> int:
    """Write a grid of the most confident mistakes (true -> predicted, confidence) as a PNG; return how many.

    `images` are uint8 [N, H, W] or [N, C, H, W] with one (gray) or three (RGB) channels.
    """
    classes = _drawable(classes)
    wrong = np.flatnonzero(labels != predicted)
    worst = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    columns = 6
    rows = max(1, -(-len(worst) // columns))
    fig = Figure(figsize=(columns * 1.9, rows * 2.1 + 0.5))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, worst, strict=False):
        ax.imshow(_displayable(images[index]), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{classes[labels[index]]} -> {classes[predicted[index]]}\n{confidence[index]:.0%}", fontsize=8)
    shown = f"the {len(worst)} most confident of {len(wrong):,} mistakes" if len(wrong) else "no mistakes"
    fig.suptitle(f"{title}: {shown} (true -> predicted)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return len(worst)
