"""Segmentation metrics.

Semantic metrics compare a binary prediction with a binary ground truth voxel by voxel,
over whole (z, y, x) volumes: Dice ``2·TP / (2·TP + FP + FN)`` and IoU (Jaccard)
``TP / (TP + FP + FN)``. Both are 1.0 when prediction and truth are both empty (nothing
to find, nothing found), which keeps validation on a volume without mitochondria from
dividing by zero.

Counts are kept as :class:`ConfusionCounts` so that several volumes (or several blocks of
one volume) can be pooled exactly: ``sum(counts).iou`` is the IoU of the concatenation,
which a mean of per-volume IoUs is not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ConfusionCounts", "confusion_counts", "dice_iou", "dice_score", "iou_score"]


@dataclass(frozen=True)
class ConfusionCounts:
    """Voxel counts of a binary comparison: true positives, false positives, false negatives."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __add__(self, other: ConfusionCounts) -> ConfusionCounts:
        return ConfusionCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    def __radd__(self, other: object) -> ConfusionCounts:
        # Lets the built-in sum() start from 0.
        if other == 0:
            return self
        return NotImplemented  # type: ignore[return-value]

    @property
    def dice(self) -> float:
        denominator = 2 * self.tp + self.fp + self.fn
        return 1.0 if denominator == 0 else 2 * self.tp / denominator

    @property
    def iou(self) -> float:
        denominator = self.tp + self.fp + self.fn
        return 1.0 if denominator == 0 else self.tp / denominator

    def as_dict(self) -> dict[str, float | int]:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "dice": self.dice, "iou": self.iou}


def confusion_counts(prediction: np.ndarray, target: np.ndarray) -> ConfusionCounts:
    """Count TP/FP/FN of two arrays of the same shape; non-zero (or True) is foreground.

    Raises:
        ValueError: the shapes differ.
    """
    pred = np.asarray(prediction) != 0
    true = np.asarray(target) != 0
    if pred.shape != true.shape:
        raise ValueError(f"prediction shape {pred.shape} != target shape {true.shape}")
    tp = int(np.count_nonzero(pred & true))
    return ConfusionCounts(
        tp=tp,
        fp=int(np.count_nonzero(pred)) - tp,
        fn=int(np.count_nonzero(true)) - tp,
    )


def dice_iou(prediction: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """``(dice, iou)`` of a binary prediction against a binary target (see module docstring)."""
    counts = confusion_counts(prediction, target)
    return counts.dice, counts.iou


def dice_score(prediction: np.ndarray, target: np.ndarray) -> float:
    """Dice coefficient (F1 over voxels) of two binary arrays."""
    return confusion_counts(prediction, target).dice


def iou_score(prediction: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union (Jaccard index) of two binary arrays."""
    return confusion_counts(prediction, target).iou
