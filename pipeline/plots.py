"""PNG figures for reports: confusion matrices (and, for exports, grids of mistakes).

matplotlib runs headless (Agg); every function writes one file and closes its figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402


def confusion_counts(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels.astype(np.int64), predicted.astype(np.int64)), 1)
    return counts


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: Sequence[str], path: Path,
                     title: str) -> np.ndarray:
    """Write the confusion matrix (counts, rows = true class) as a PNG; return the counts."""
    counts = confusion_counts(labels, predicted, len(classes))
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    size = max(5.0, 0.55 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(counts, cmap="Blues")
    for (row, col), n in np.ndenumerate(counts):
        if n:
            ax.text(col, row, str(n), ha="center", va="center", fontsize=8,
                    color="white" if n > counts.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} (accuracy {accuracy:.4f}, {counts.sum():,} images)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return counts
