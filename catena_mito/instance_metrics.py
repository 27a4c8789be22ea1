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
  when their IoU (``|A∩B| / (|A| + |B| - |A∩B|)``, in voxels) is ``>= t``, one-to-one,
  choosing the matching with the most pairs (then the largest total IoU). For ``t > 0.5``
  the candidate pairs are already one-to-one (two objects cannot both cover more than
  half of a third); for ``t <= 0.5`` an object may have several candidates and the optimum
  is found exactly by a sparse linear assignment of the candidate pairs
  (:func:`match_instances`), so every threshold in (0, 1] is exact.
  With ``TP`` matches, ``FP = n_pred - TP``, ``FN = n_gt - TP``:
  precision ``TP / (TP + FP)``, recall ``TP / (TP + FN)``, F1 ``2TP / (2TP + FP + FN)``
  and **AP@t = TP / (TP + FP + FN)** — the "average precision" of StarDist's
  ``matching`` (there called accuracy) and of Cellpose's ``average_precision``.
  ``mean_ap`` is AP@t averaged over ``t = 0.50, 0.55, …, 0.95``.
* Ranked AP (:func:`ranked_ap`): the area under a precision/recall curve of the
  predictions ranked by confidence (voxel count: an instance volume carries no score),
  101-point interpolated. ``mitoem_ap`` is the MitoEM challenge's definition (each
  prediction is judged by its best-overlapping ground-truth object, not one-to-one) and
  ``mitoem_ap75`` its headline score at IoU 0.75; ``coco_ap`` uses COCO's one-to-one
  matching in rank order, and ``coco_map`` is COCO's AP@[.50:.05:.95], its mean over
  ``t = 0.50, 0.55, …, 0.95``.
* A ratio whose denominator is zero is 1.0 when ground truth and prediction are both
  empty (nothing to find, nothing found) and 0.0 otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from catena_mito.errors import ConfigError

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


def check_iou_thresholds(thresholds: Sequence[float], name: str = "--iou") -> tuple[float, ...]:
    """The thresholds as floats, each in (0, 1]; a usage error (exit 2) otherwise."""
    out = []
    for t in thresholds:
        try:
            value = float(t)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} {t!r}: expected a number in (0, 1]") from None
        if not 0.0 < value <= 1.0:  # also refuses NaN
            raise ConfigError(f"{name} {t!r}: an IoU threshold must be in (0, 1]")
        out.append(value)
    if not out:
        raise ConfigError(f"{name}: give at least one IoU threshold")
    return tuple(out)


def match_instances(tables: dict[str, np.ndarray], threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Optimal one-to-one matches with IoU ``>= threshold``: ``(gt_ids, pred_ids, ious)``.

    *Optimal* means the most matches and, among matchings with that many, the largest
    total IoU. For ``threshold > 0.5`` every object has at most one candidate, so the
    candidate pairs are the answer. At ``threshold <= 0.5`` a ground-truth object can have
    several candidates (a mitochondrion split into two halves has IoU 0.5 with each), and a
    greedy pick by IoU can lose matches; the pairs that share an object with another pair
    are therefore solved exactly by one *sparse* linear assignment
    (:func:`scipy.sparse.csgraph.min_weight_full_bipartite_matching`, see
    :func:`_assign_optimal`), whose work grows with the candidate pairs, not with the
    square of the objects. Deterministic: ids are sorted.
    Returned sorted by ground-truth id.
    """
    ious = pair_ious(tables)
    keep = ious >= threshold
    g, p, iou = tables["pair_gt"][keep], tables["pair_pred"][keep], ious[keep]
    if g.size == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.float64)
    ug, gi = np.unique(g, return_inverse=True)
    up, pi = np.unique(p, return_inverse=True)
    gi, pi = gi.ravel(), pi.ravel()
    # Pairs whose two objects have no other candidate need no solver (all of them above 0.5).
    single = (np.bincount(gi, minlength=len(ug))[gi] == 1) & (np.bincount(pi, minlength=len(up))[pi] == 1)
    chosen = [np.flatnonzero(single)]
    rest = np.flatnonzero(~single)
    if rest.size:
        chosen.append(rest[_assign_optimal(gi[rest], pi[rest], iou[rest])])
    sel = np.concatenate(chosen)
    sel = sel[np.argsort(g[sel], kind="stable")]
    return g[sel].astype(np.uint64), p[sel].astype(np.uint64), iou[sel].astype(np.float64)


def _assign_optimal(gi: np.ndarray, pi: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """Indices of the pairs ``(gi[k], pi[k])`` in a matching with the most pairs, then the
    largest total IoU, by one sparse linear assignment (LAPJVsp).

    The solver needs a *full* matching, so the graph gets a dummy partner per object: row
    ``g`` may go to its dummy column, column ``p`` to its dummy row, and the dummy of ``p``
    to the dummy of ``g`` for every candidate pair (so a pair taken leaves both dummies a
    partner). With dummy edges costing ``D = B + 2``, dummy-to-dummy 1 and a pair
    ``B + 3 - IoU``, each pair taken changes the total by ``-(B + IoU)``: with ``B`` above
    any total IoU, the count comes first. Every cost is positive (the solver drops zeros).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    rows, r_inv = np.unique(gi, return_inverse=True)
    cols, c_inv = np.unique(pi, return_inverse=True)
    r_inv, c_inv = r_inv.ravel(), c_inv.ravel()
    n_r, n_c = len(rows), len(cols)
    big = float(min(n_r, n_c) + 1)
    # Rows: objects 0..n_r-1, then the dummies of the columns; columns: objects, then the
    # dummies of the rows.
    ar_r, ar_c = np.arange(n_r), np.arange(n_c)
    i = np.concatenate([r_inv, ar_r, n_r + ar_c, n_r + c_inv])
    j = np.concatenate([c_inv, n_c + ar_r, ar_c, n_c + r_inv])
    w = np.concatenate([big + 3.0 - iou, np.full(n_r + n_c, big + 2.0), np.ones(len(iou))])
    graph = coo_matrix((w, (i, j)), shape=(n_r + n_c, n_c + n_r)).tocsr()  # duplicates: none
    row_ind, col_ind = min_weight_full_bipartite_matching(graph)
    real = (row_ind < n_r) & (col_ind < n_c)
    pair_at = {(int(a), int(b)): k for k, (a, b) in enumerate(zip(r_inv, c_inv))}
    return np.array(sorted(pair_at[(int(a), int(b))] for a, b in zip(row_ind[real], col_ind[real])), np.int64)


# --- ranked average precision (MitoEM challenge, COCO) --------------------------------------

#: Recall points of the interpolated precision: 0, 0.01, …, 1 (as computed by both codes).
RECALL_POINTS: np.ndarray = 0.01 * np.arange(101)


def prediction_order(tables: dict[str, np.ndarray], scores: np.ndarray | None = None) -> np.ndarray:
    """Indices into ``tables["pred_ids"]`` by descending confidence, ties by ascending id.

    ``scores`` (one per predicted id) default to the objects' voxel counts, the MitoEM
    evaluation's default when no confidence file is given (larger objects first).
    """
    sizes = tables["pred_sizes"] if scores is None else np.asarray(scores, np.float64)
    if len(sizes) != len(tables["pred_ids"]):
        raise ValueError(f"{len(sizes)} scores for {len(tables['pred_ids'])} predicted objects")
    return np.argsort(-np.asarray(sizes, np.float64), kind="stable")  # ids are sorted already


def _interpolated_ap(is_tp: np.ndarray, n_gt: int) -> float:
    """Area under the 101-point interpolated precision/recall curve of ranked detections."""
    tp = np.cumsum(is_tp, dtype=np.float64)
    fp = np.cumsum(~is_tp, dtype=np.float64)
    recall = tp / n_gt
    precision = tp / (tp + fp + np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # precision envelope
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    q = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
    return float(q.mean())


def ranked_ap(
    tables: dict[str, np.ndarray], threshold: float, kind: str = "mitoem", scores: np.ndarray | None = None
) -> float:
    """Average precision of the predictions ranked by confidence (see :func:`prediction_order`).

    * ``kind="mitoem"`` — the MitoEM challenge's AP (``mAP_3Dvolume``, COCO's accumulate
      on 3-D volumes): each prediction is a true positive when the ground-truth object it
      overlaps best has IoU ``>= threshold``. Not one-to-one: below 0.5 two predictions
      may both count for one object, as in the challenge code. The challenge ranks by
      AP at 0.75 (``mitoem_ap75``).
    * ``kind="coco"`` — COCO's matching: in rank order, each prediction takes the still
      unmatched ground-truth object it overlaps best with IoU ``>= threshold`` (ties: the
      smaller id), one-to-one.

    Either way the precision envelope is sampled at 101 recall points 0:0.01:1 and
    averaged. With no ground truth the AP is 1.0 if nothing is predicted, else 0.0 (the
    COCO code would leave it undefined).
    """
    n_gt, n_pred = len(tables["gt_ids"]), len(tables["pred_ids"])
    if n_gt == 0:
        return 1.0 if n_pred == 0 else 0.0
    if n_pred == 0:
        return 0.0
    order = prediction_order(tables, scores)
    rank = np.empty(n_pred, np.int64)
    rank[order] = np.arange(n_pred)
    ious = pair_ious(tables)
    pred_index = np.searchsorted(tables["pred_ids"], tables["pair_pred"])
    gt_index = np.searchsorted(tables["gt_ids"], tables["pair_gt"])
    is_tp = np.zeros(n_pred, bool)  # by rank
    if kind == "mitoem":
        # Best ground truth per prediction: pairs sorted by prediction, then IoU descending,
        # then gt id ascending; the first pair of each prediction is its best.
        s = np.lexsort((gt_index, -ious, pred_index))
        first = np.ones(len(s), bool)
        first[1:] = pred_index[s][1:] != pred_index[s][:-1]
        best = s[first]
        is_tp[rank[pred_index[best]]] = ious[best] >= threshold
    elif kind == "coco":
        keep = ious >= threshold
        s = np.lexsort((gt_index[keep], -ious[keep], rank[pred_index[keep]]))
        cand_rank, cand_gt = rank[pred_index[keep]][s], gt_index[keep][s]
        taken = np.zeros(n_gt, bool)
        for r, g in zip(cand_rank.tolist(), cand_gt.tolist()):
            if not is_tp[r] and not taken[g]:
                is_tp[r], taken[g] = True, True
    else:
        raise ValueError(f"kind must be 'mitoem' or 'coco', got {kind!r}")
    return _interpolated_ap(is_tp, n_gt)


def without_small_truth(
    tables: dict[str, np.ndarray], min_size: int
) -> tuple[dict[str, np.ndarray], int, int]:
    """``tables`` without the ground-truth objects of fewer than ``min_size`` voxels, and
    without the predicted objects that overlap those more than all scored ones together
    (COCO's rule for detections of ignored objects: neither a hit nor a false alarm).

    In a crop, mitochondria cut by its faces leave slivers of a few voxels that
    ``thres_small_instances`` removes from any prediction by design; scoring without
    them says how well the objects that can be found are found. Returns the filtered
    tables and how many ground-truth and predicted objects were left out.
    """
    keep_gt = tables["gt_sizes"] >= min_size
    dropped = tables["gt_ids"][~keep_gt]
    on_dropped = np.isin(tables["pair_gt"], dropped)
    pred_ids = tables["pred_ids"]
    at = np.searchsorted(pred_ids, tables["pair_pred"])
    ignored_overlap = np.bincount(at[on_dropped], tables["pair_intersection"][on_dropped], len(pred_ids))
    scored_overlap = np.bincount(at[~on_dropped], tables["pair_intersection"][~on_dropped], len(pred_ids))
    keep_pred = ~(ignored_overlap > scored_overlap)
    kept_pair = ~on_dropped & keep_pred[at]
    out = {
        "gt_ids": tables["gt_ids"][keep_gt], "gt_sizes": tables["gt_sizes"][keep_gt],
        "pred_ids": pred_ids[keep_pred], "pred_sizes": tables["pred_sizes"][keep_pred],
        "pair_gt": tables["pair_gt"][kept_pair], "pair_pred": tables["pair_pred"][kept_pair],
        "pair_intersection": tables["pair_intersection"][kept_pair],
    }
    return out, int((~keep_gt).sum()), int((~keep_pred).sum())


def instance_scores(
    tables: dict[str, np.ndarray], thresholds: Sequence[float] = (0.5, 0.75), min_gt_size: int = 0
) -> dict[str, Any]:
    """Every instance score of the module docstring, at each IoU threshold and averaged.

    Returns ``{"n_gt", "n_pred", "thresholds": {"0.5": {...}, ...}, "mean_ap",
    "mitoem_ap75", "coco_map", "ap_rank"}`` where each threshold entry has ``tp``, ``fp``,
    ``fn``, ``precision``, ``recall``, ``f1``, ``ap`` (``TP / (TP + FP + FN)``),
    ``mean_matched_iou``, ``mitoem_ap`` and ``coco_ap`` (see :func:`ranked_ap`).
    With ``min_gt_size`` > 0 it also holds ``without_small_truth``: the same scores
    without the ground-truth objects under ``min_gt_size`` voxels
    (:func:`without_small_truth`), with ``min_gt_size``, ``n_gt_ignored`` and
    ``n_pred_ignored``; the main scores always count every object.
    """
    thresholds = check_iou_thresholds(thresholds)
    if min_gt_size > 0:
        filtered, n_gt_ignored, n_pred_ignored = without_small_truth(tables, min_gt_size)
        return {
            **instance_scores(tables, thresholds),
            "without_small_truth": {
                "min_gt_size": int(min_gt_size), "n_gt_ignored": n_gt_ignored, "n_pred_ignored": n_pred_ignored,
                **instance_scores(filtered, thresholds),
            },
        }
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

    per = {
        f"{t:g}": {**at(t), "mitoem_ap": ranked_ap(tables, t, "mitoem"), "coco_ap": ranked_ap(tables, t, "coco")}
        for t in thresholds
    }
    mean_ap = float(np.mean([at(t)["ap"] for t in MEAN_AP_THRESHOLDS]))
    return {
        "n_gt": n_gt, "n_pred": n_pred, "thresholds": per, "mean_ap": mean_ap,
        "mitoem_ap75": ranked_ap(tables, 0.75, "mitoem"),
        "coco_map": float(np.mean([ranked_ap(tables, t, "coco") for t in MEAN_AP_THRESHOLDS])),
        "ap_rank": "predictions ranked by voxel count (largest first), as MitoEM's evaluation without a score file",
    }


def format_ranked(inst: dict[str, Any]) -> list[str]:
    """Report lines for the ranked APs of :func:`instance_scores` (for ``evaluate``)."""
    per = "  ".join(f"@{t} {row['mitoem_ap']:.4f}/{row['coco_ap']:.4f}" for t, row in inst["thresholds"].items())
    return [
        f"  MitoEM AP-75: {inst['mitoem_ap75']:.4f}   COCO mAP (IoU 0.50:0.05:0.95): {inst['coco_map']:.4f}",
        f"  ranked AP MitoEM/COCO {per}  ({inst['ap_rank']})",
    ]
