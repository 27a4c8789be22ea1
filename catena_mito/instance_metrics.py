"""Segmentation metrics from counts that accumulate block by block.

Nothing here needs a whole volume in memory: semantic scores come from voxel counts
(:class:`SemanticCounts`), instance scores from the *contingency table* of ground-truth
and predicted ids (:class:`Contingency`), which holds one row per pair of overlapping
objects plus each object's size. Both are filled block by block and then reduced.

Conventions (documented in ``docs/tuning.md`` and the ``evaluate`` help):

* Semantic: foreground Dice ``2TP / (2TP + FP + FN)``, IoU ``TP / (TP + FP + FN)``;
  background scores are the same with the roles of 0 and 1 swapped; ``mean_*`` is the
  mean of foreground and background.
* Instances: a ground-truth object and a predicted object *match* at threshold ``t``
  when their IoU (``|A∩B| / (|A| + |B| - |A∩B|)``, in voxels) is ``>= t``, one-to-one.
  For ``t > 0.5`` the candidate pairs are already one-to-one (two objects cannot both
  cover more than half of a third), so the greedy assignment by descending IoU used here
  is the optimal one; at exactly 0.5 it is optimal too except for exact ties.
  With ``TP`` matches, ``FP = n_pred - TP``, ``FN = n_gt - TP``:
  precision ``TP / (TP + FP)``, recall ``TP / (TP + FN)``, F1 ``2TP / (2TP + FP + FN)``
  and **AP@t = TP / (TP + FP + FN)** — the "average precision" of StarDist's
  ``matching`` (there called accuracy) and of Cellpose's ``average_precision``.
  ``mean_ap`` is AP@t averaged over ``t = 0.50, 0.55, …, 0.95``.
* A ratio whose denominator is zero is 1.0 when ground truth and prediction are both
  empty (nothing to find, nothing found) and 0.0 otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Thresholds averaged into ``mean_ap``.
MEAN_AP_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def _ratio(num: float, den: float, both_empty: bool) -> float:
    if den == 0:
        return 1.0 if both_empty else 0.0
    return float(num) / float(den)


# --- semantic -------------------------------------------------------------------------------


@dataclass
class SemanticCounts:
    """Voxel counts of a binary comparison, accumulated over blocks."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Add one block: ``gt`` and ``pred`` are boolean arrays of the same shape."""
        gt = np.asarray(gt, dtype=bool)
        pred = np.asarray(pred, dtype=bool)
        if gt.shape != pred.shape:
            raise ValueError(f"block shapes differ: gt {gt.shape}, prediction {pred.shape}")
        tp = int(np.count_nonzero(gt & pred))
        n_gt, n_pred = int(np.count_nonzero(gt)), int(np.count_nonzero(pred))
        self.tp += tp
        self.fp += n_pred - tp
        self.fn += n_gt - tp
        self.tn += gt.size - n_gt - n_pred + tp

    def scores(self) -> dict[str, Any]:
        """Dice and IoU of foreground and background, and their means."""
        tp, fp, fn, tn = self.tp, self.fp, self.fn, self.tn
        fg_empty = tp + fp + fn == 0  # no foreground anywhere: background is perfect too
        bg_empty = tn + fp + fn == 0
        out = {
            "dice": _ratio(2 * tp, 2 * tp + fp + fn, fg_empty),
            "iou": _ratio(tp, tp + fp + fn, fg_empty),
            "background_dice": _ratio(2 * tn, 2 * tn + fp + fn, bg_empty),
            "background_iou": _ratio(tn, tn + fp + fn, bg_empty),
            "precision": _ratio(tp, tp + fp, fg_empty),
            "recall": _ratio(tp, tp + fn, fg_empty),
        }
        out["mean_dice"] = (out["dice"] + out["background_dice"]) / 2
        out["mean_iou"] = (out["iou"] + out["background_iou"]) / 2
        out["counts"] = {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
        return out


# --- instances ------------------------------------------------------------------------------


def _reduce_pairs(a: np.ndarray, b: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum ``counts`` over equal ``(a, b)`` pairs."""
    if a.size == 0:
        return a, b, counts
    pairs = np.stack([a, b], axis=1)
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    summed = np.bincount(inverse.ravel(), weights=counts, minlength=len(unique)).astype(np.int64)
    return unique[:, 0].copy(), unique[:, 1].copy(), summed


def _reduce_ids(ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if ids.size == 0:
        return ids, counts
    unique, inverse = np.unique(ids, return_inverse=True)
    return unique, np.bincount(inverse.ravel(), weights=counts, minlength=len(unique)).astype(np.int64)


@dataclass
class Contingency:
    """Pairwise overlaps of ground-truth and predicted objects, accumulated over blocks.

    Id 0 is background in both volumes. Blocks may come in any order and any shape; an
    object spanning blocks has its counts summed, so the result does not depend on the
    block shape. Memory grows with the number of overlapping pairs, not with the volume.
    """

    _gt_ids: list[np.ndarray] = field(default_factory=list)
    _gt_sizes: list[np.ndarray] = field(default_factory=list)
    _pred_ids: list[np.ndarray] = field(default_factory=list)
    _pred_sizes: list[np.ndarray] = field(default_factory=list)
    _pair_gt: list[np.ndarray] = field(default_factory=list)
    _pair_pred: list[np.ndarray] = field(default_factory=list)
    _pair_counts: list[np.ndarray] = field(default_factory=list)
    _pending: int = 0

    #: Reduce the pending per-block lists once they hold this many rows (bounds memory).
    compact_every: int = 1_000_000

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Add one block of ground-truth ids and predicted ids (same shape, any int dtype)."""
        gt = np.asarray(gt).ravel()
        pred = np.asarray(pred).ravel()
        if gt.shape != pred.shape:
            raise ValueError(f"block shapes differ: gt {gt.shape}, prediction {pred.shape}")
        gt = gt.astype(np.uint64, copy=False)
        pred = pred.astype(np.uint64, copy=False)
        for ids, id_list, size_list in ((gt, self._gt_ids, self._gt_sizes), (pred, self._pred_ids, self._pred_sizes)):
            u, c = np.unique(ids[ids != 0], return_counts=True)
            id_list.append(u)
            size_list.append(c.astype(np.int64))
        both = (gt != 0) & (pred != 0)
        if np.any(both):
            # Pairs through compact indices: one 1-D unique instead of a row-wise one.
            ug, ig = np.unique(gt[both], return_inverse=True)
            up, ip = np.unique(pred[both], return_inverse=True)
            keys, counts = np.unique(ig.astype(np.int64) * len(up) + ip, return_counts=True)
            self._pair_gt.append(ug[keys // len(up)])
            self._pair_pred.append(up[keys % len(up)])
            self._pair_counts.append(counts.astype(np.int64))
            self._pending += len(keys)
        self._pending += len(self._gt_ids[-1]) + len(self._pred_ids[-1])
        if self._pending >= self.compact_every:
            self._compact()

    def _compact(self) -> None:
        def cat(items: list[np.ndarray], dtype) -> np.ndarray:
            return np.concatenate(items) if items else np.zeros(0, dtype)

        g, gs = _reduce_ids(cat(self._gt_ids, np.uint64), cat(self._gt_sizes, np.int64))
        p, ps = _reduce_ids(cat(self._pred_ids, np.uint64), cat(self._pred_sizes, np.int64))
        a, b, c = _reduce_pairs(
            cat(self._pair_gt, np.uint64), cat(self._pair_pred, np.uint64), cat(self._pair_counts, np.int64)
        )
        self._gt_ids, self._gt_sizes = [g], [gs]
        self._pred_ids, self._pred_sizes = [p], [ps]
        self._pair_gt, self._pair_pred, self._pair_counts = [a], [b], [c]
        self._pending = len(g) + len(p) + len(a)

    def tables(self) -> dict[str, np.ndarray]:
        """The reduced table: ``gt_ids``/``gt_sizes``, ``pred_ids``/``pred_sizes`` and the
        overlapping pairs ``pair_gt``, ``pair_pred``, ``pair_intersection`` (voxels)."""
        self._compact()
        return {
            "gt_ids": self._gt_ids[0], "gt_sizes": self._gt_sizes[0],
            "pred_ids": self._pred_ids[0], "pred_sizes": self._pred_sizes[0],
            "pair_gt": self._pair_gt[0], "pair_pred": self._pair_pred[0],
            "pair_intersection": self._pair_counts[0],
        }


def pair_ious(tables: dict[str, np.ndarray]) -> np.ndarray:
    """IoU of every overlapping pair in ``tables`` (see :meth:`Contingency.tables`)."""
    gt_size = tables["gt_sizes"][np.searchsorted(tables["gt_ids"], tables["pair_gt"])]
    pred_size = tables["pred_sizes"][np.searchsorted(tables["pred_ids"], tables["pair_pred"])]
    inter = tables["pair_intersection"]
    return inter / (gt_size + pred_size - inter).astype(np.float64)


def match_instances(tables: dict[str, np.ndarray], threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matches with IoU ``>= threshold``: ``(gt_ids, pred_ids, ious)``.

    Greedy by descending IoU (ties broken by ids, so the result is deterministic); exact
    for thresholds above 0.5, where every object has at most one candidate.
    """
    ious = pair_ious(tables)
    keep = ious >= threshold
    g, p, iou = tables["pair_gt"][keep], tables["pair_pred"][keep], ious[keep]
    order = np.lexsort((p, g, -iou))
    used_g: set[int] = set()
    used_p: set[int] = set()
    mg, mp, mi = [], [], []
    for i in order:
        a, b = int(g[i]), int(p[i])
        if a in used_g or b in used_p:
            continue
        used_g.add(a)
        used_p.add(b)
        mg.append(a)
        mp.append(b)
        mi.append(float(iou[i]))
    return np.array(mg, np.uint64), np.array(mp, np.uint64), np.array(mi, np.float64)


def instance_scores(
    tables: dict[str, np.ndarray], thresholds: Sequence[float] = (0.5, 0.75)
) -> dict[str, Any]:
    """Precision, recall, F1 and AP (``TP / (TP + FP + FN)``) at each IoU threshold.

    Returns ``{"n_gt", "n_pred", "thresholds": {"0.5": {...}, ...}, "mean_ap"}`` where
    each threshold entry has ``tp``, ``fp``, ``fn``, ``precision``, ``recall``, ``f1``,
    ``ap`` and ``mean_matched_iou``.
    """
    n_gt, n_pred = len(tables["gt_ids"]), len(tables["pred_ids"])
    empty = n_gt == 0 and n_pred == 0

    def at(t: float) -> dict[str, Any]:
        _, _, ious = match_instances(tables, t)
        tp = len(ious)
        fp, fn = n_pred - tp, n_gt - tp
        return {
            "tp": tp, "fp": fp, "fn": fn,
            "precision": _ratio(tp, tp + fp, empty),
            "recall": _ratio(tp, tp + fn, empty),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn, empty),
            "ap": _ratio(tp, tp + fp + fn, empty),
            "mean_matched_iou": float(ious.mean()) if tp else (1.0 if empty else 0.0),
        }

    per = {f"{t:g}": at(t) for t in thresholds}
    mean_ap = float(np.mean([at(t)["ap"] for t in MEAN_AP_THRESHOLDS]))
    return {"n_gt": n_gt, "n_pred": n_pred, "thresholds": per, "mean_ap": mean_ap}
