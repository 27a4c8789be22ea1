"""``catena-mito evaluate``: semantic and instance scores against ground truth, block by block.

The ground truth is an instance-id volume (``volumes/labels/mito_ids``; 0 = background).
A *prediction* (probabilities) is binarised with ``probability > threshold`` — uint8
volumes are read as ``value / 255``, floats as they are — and scored with Dice and IoU
(see :class:`~catena_mito.instance_metrics.SemanticCounts`). An *instance* volume (from
``label``) is scored by one-to-one matching at IoU thresholds (precision, recall, F1 and
AP = TP / (TP + FP + FN), see :mod:`catena_mito.instance_metrics`).

The volumes are read one block at a time (``block_shape`` voxels, z, y, x), so memory is
a few blocks plus the contingency table, whatever the volume size. The result does not
depend on the block shape.

**Instance modes** (``instance_modes``): besides an instance volume written by ``label``,
the prediction itself can be turned into instances in each of ``label``'s modes and each
scored, to compare them without a ``label`` run per mode: ``connected_components`` always,
``contour`` when a contour prediction lies beside the foreground
(``<prediction>_contour``, :func:`catena_mito.targets.prediction_url`); ``auto`` = every
mode that can run. This uses :func:`catena_mito.instances.instances_whole_volume`, which
gives ``label``'s ids for the same settings (``label_settings``: the LabelConfig fields
that decide instances, default LabelConfig's), on the whole volume in memory, so it is
for crops up to :data:`MODES_MAX_VOXELS` voxels.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from catena_mito import storage
from catena_mito.blockwise.geometry import BlockGrid, as_coord
from catena_mito.blockwise.runs import check_input
from catena_mito.errors import ConfigError, DataError, StorageError
from catena_mito.instance_metrics import (
    Contingency,
    SemanticCounts,
    check_iou_thresholds,
    format_ranked,
    instance_scores,
)

log = logging.getLogger(__name__)

#: Default block edge (voxels); rounded up to whole chunks of the ground truth.
DEFAULT_BLOCK_EDGE = 128
#: Largest volume (voxels) whose instance modes are computed in memory (about 1.5 GB
#: working memory: two probability volumes, the ids and the growth's scratch).
MODES_MAX_VOXELS = 2**27
#: The instance modes evaluate can run from a prediction (``auto``: those that can).
INSTANCE_MODES = ("connected_components", "contour")


def resolve_gt(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[str, str | None]:
    """``(gt_array_url, dataset_url)``: ``url`` is a dataset (group) or an array.

    For a dataset the ground truth is ``volumes/labels/mito_ids`` and ``dataset_url`` is
    the group, where default prediction/instance arrays are looked up.
    """
    if storage.array_exists(url, storage_options):
        return url, None
    candidate = storage.join_url(url, storage.LABEL_PATHS["mito"])
    if storage.array_exists(candidate, storage_options):
        return candidate, url
    raise StorageError(
        f"--gt {storage.redact_url(url)!r}: neither a Zarr array nor a dataset with "
        f"{storage.LABEL_PATHS['mito']}"
    )


def _default_block_shape(chunks: Sequence[int]) -> tuple[int, int, int]:
    return tuple(max(1, -(-DEFAULT_BLOCK_EDGE // c)) * c for c in chunks)  # type: ignore[return-value]


def _check_compatible(name: str, url: str, arr, gt_url: str, gt) -> None:
    if tuple(arr.shape) != tuple(gt.shape):
        raise DataError(
            f"{name} {storage.redact_url(url)!r} has shape {list(arr.shape)} but the ground truth "
            f"{storage.redact_url(gt_url)!r} has {list(gt.shape)}; evaluate needs the same grid "
            "(predict with output_res: original, or resample first)"
        )
    res, _ = storage.read_spatial(arr)
    gt_res, _ = storage.read_spatial(gt)
    if res is not None and gt_res is not None and not np.allclose(res, gt_res):
        raise DataError(
            f"{name} {storage.redact_url(url)!r} has resolution {list(res)} nm but the ground "
            f"truth has {list(gt_res)} nm"
        )


def binarise(block: np.ndarray, threshold: float) -> np.ndarray:
    """Foreground where probability > ``threshold``; uint8 holds probability × 255."""
    if block.dtype == np.uint8:
        # Compare in integers: value/255 > t  <=>  value > 255 t (no float copy of the block).
        return block > threshold * 255.0
    if np.issubdtype(block.dtype, np.floating):
        return block > threshold
    if block.dtype == np.bool_:
        return block
    raise DataError(f"prediction dtype {block.dtype} is not a probability (expected uint8 or float)")


def check_options(threshold: float, iou_thresholds: Sequence[float], min_gt_size: int = 0) -> None:
    """Refuse out-of-range options as usage errors (exit 2) before anything is read."""
    if not 0.0 <= threshold <= 1.0:  # also refuses NaN
        raise ConfigError(f"--threshold {threshold!r}: a probability threshold must be in [0, 1]")
    check_iou_thresholds(iou_thresholds)
    if isinstance(min_gt_size, bool) or not isinstance(min_gt_size, (int, np.integer)) or min_gt_size < 0:
        raise ConfigError(f"--min-gt-size {min_gt_size!r}: expected a voxel count >= 0")


def evaluate(
    gt: str,
    prediction: str | None = None,
    instances: str | None = None,
    *,
    threshold: float = 0.5,
    iou_thresholds: Sequence[float] = (0.5, 0.75),
    block_shape: Sequence[int] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = False,
    allow_incomplete: bool = False,
    instance_modes: Sequence[str] | str | None = None,
    label_settings: Mapping[str, Any] | None = None,
    min_gt_size: int = 0,
) -> dict[str, Any]:
    """Score ``prediction`` and/or ``instances`` against ``gt``; returns a JSON-able report.

    ``gt`` is a dataset URL (then ``volumes/labels/mito_ids`` is the truth, and missing
    ``prediction``/``instances`` default to ``volumes/predictions/mito`` and
    ``volumes/labels/mito_instances`` when they exist) or an array URL. ``block_shape``
    is in voxels (z, y, x); default: about 128³ rounded up to whole ground-truth chunks.
    A prediction or instance volume written by catena-mito that is incomplete or stale is
    refused (:class:`~catena_mito.errors.IncompleteInputError`) unless ``allow_incomplete``.
    ``instance_modes``: ``"auto"`` or a list of modes to decode from the prediction and
    score (see the module docstring), with ``label_settings`` (LabelConfig fields).
    ``min_gt_size`` > 0 adds instance scores without the ground-truth objects under that
    many voxels (:func:`~catena_mito.instance_metrics.without_small_truth`) beside the
    scores of every object.
    """
    check_options(threshold, iou_thresholds, min_gt_size)
    gt_url, dataset = resolve_gt(gt, storage_options)
    if dataset is not None and prediction is None and instances is None:
        for default, kind in ((storage.prediction_path("mito"), "prediction"), (storage.INSTANCES_PATH, "instances")):
            url = storage.join_url(dataset, default)
            if storage.array_exists(url, storage_options):
                if kind == "prediction":
                    prediction = url
                else:
                    instances = url
    if prediction is None and instances is None:
        raise DataError(
            f"nothing to evaluate against {storage.redact_url(gt_url)!r}: give --prediction "
            "and/or --instances"
        )
    gt_arr = storage.open_volume(gt_url, storage_options)
    if not (np.issubdtype(gt_arr.dtype, np.integer) or gt_arr.dtype == np.bool_):
        raise DataError(f"ground truth {storage.redact_url(gt_url)!r} has dtype {gt_arr.dtype}, expected integer ids")
    pred_arr = inst_arr = None
    if prediction is not None:
        pred_arr = storage.open_volume(prediction, storage_options)
        check_input(pred_arr, prediction, f"prediction {storage.redact_url(prediction)!r}", storage_options,
                    allow_incomplete=allow_incomplete)
        _check_compatible("prediction", prediction, pred_arr, gt_url, gt_arr)
        if not (pred_arr.dtype == np.uint8 or np.issubdtype(pred_arr.dtype, np.floating)):
            raise DataError(
                f"prediction {storage.redact_url(prediction)!r} has dtype {pred_arr.dtype}, expected "
                "uint8 (probability × 255) or float probabilities; pass instance ids as --instances"
            )
    if instances is not None:
        inst_arr = storage.open_volume(instances, storage_options)
        check_input(inst_arr, instances, f"instances {storage.redact_url(instances)!r}", storage_options,
                    allow_incomplete=allow_incomplete)
        _check_compatible("instances", instances, inst_arr, gt_url, gt_arr)
        if not np.issubdtype(inst_arr.dtype, np.integer):
            raise DataError(f"instances {storage.redact_url(instances)!r} have dtype {inst_arr.dtype}, expected integer ids")

    # Checked before any block is read: a bad mode or setting costs nothing.
    modes = resolve_instance_modes(instance_modes, prediction, gt_arr, label_settings, storage_options)
    shape = as_coord(block_shape, "--block-shape") if block_shape is not None else _default_block_shape(gt_arr.chunks)
    grid = BlockGrid(tuple(gt_arr.shape), shape)
    semantic = SemanticCounts() if pred_arr is not None else None
    contingency = Contingency() if inst_arr is not None else None
    blocks = grid.blocks()
    if progress:
        from tqdm import tqdm

        blocks = tqdm(blocks, desc="evaluating", unit="block")
    for block in blocks:
        sl = block.write_roi.to_slices()
        truth = np.asarray(gt_arr[sl])
        if semantic is not None:
            semantic.update(truth != 0, binarise(np.asarray(pred_arr[sl]), threshold))
        if contingency is not None:
            contingency.update(truth, np.asarray(inst_arr[sl]))

    report: dict[str, Any] = {
        "ground_truth": storage.redact_url(gt_url),
        "shape": list(gt_arr.shape),
        "block_shape": list(shape),
    }
    if semantic is not None:
        report["semantic"] = {"prediction": storage.redact_url(prediction), "threshold": threshold, **semantic.scores()}
    if modes:
        report["instance_modes"] = score_instance_modes(
            gt_arr, prediction, modes, label_settings, iou_thresholds, storage_options, allow_incomplete,
            min_gt_size)
    if contingency is not None:
        report["instances"] = {
            "instances": storage.redact_url(instances),
            "ap_definition": "TP / (TP + FP + FN) at each IoU threshold with optimal one-to-one matching; "
                             "mean_ap averages IoU 0.50:0.05:0.95; mitoem_ap/coco_ap: ranked, 101-point "
                             "interpolated AP (MitoEM challenge / COCO matching), coco_map their COCO mean",
            **instance_scores(contingency.tables(), iou_thresholds, min_gt_size),
        }
    return report


def _settings_config(prediction: str, label_settings: Mapping[str, Any] | None) -> Any:
    """A LabelConfig holding ``label_settings`` (validated as label validates them)."""
    from catena_mito.config import LabelConfig, config_from_dict

    data = {"input_prediction_path": prediction, "output_instance_dir": "unused", **dict(label_settings or {})}
    return config_from_dict(LabelConfig, data, "label_settings")


#: The LabelConfig fields that decide instances (the rest say where data is).
INSTANCE_FIELDS = ("thres_foreground", "thres_small_instances", "connectivity", "thres_seed", "thres_contour",
                   "thres_small_seeds", "grow_distance", "seed_distance")


def instance_settings_of(config: Any) -> dict[str, Any]:
    """The instance settings of a LabelConfig, for ``label_settings``."""
    return {name: getattr(config, name) for name in INSTANCE_FIELDS if hasattr(config, name)}


def resolve_instance_modes(
    requested: Sequence[str] | str | None,
    prediction: str | None,
    gt_arr: Any,
    label_settings: Mapping[str, Any] | None,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, str | None]:
    """The modes to run, each with its contour URL (None for connected components).

    ``"auto"``: connected components, and contour when ``<prediction>_contour`` exists.

    Raises:
        DataError: an unknown mode, no prediction, a contour mode without a contour
        prediction, a volume too large for memory, or invalid ``label_settings``.
    """
    from catena_mito.targets import CONTOUR, prediction_url

    if not requested:
        return {}
    if prediction is None:
        raise DataError("instance modes decode a prediction: give --prediction (or a dataset with one)")
    contour_url = prediction_url(prediction, CONTOUR)
    has_contour = storage.array_exists(contour_url, storage_options)
    if requested == "auto" or list(requested) == ["auto"]:
        names = [m for m in INSTANCE_MODES if m != "contour" or has_contour]
    else:
        names = list(dict.fromkeys([requested] if isinstance(requested, str) else requested))
        unknown = [m for m in names if m not in INSTANCE_MODES]
        if unknown:
            raise DataError(f"instance modes {unknown}: expected 'auto' or some of {list(INSTANCE_MODES)}")
        if "contour" in names and not has_contour:
            raise DataError(f"instance mode contour needs contour probabilities beside the prediction: no array "
                            f"at {storage.redact_url(contour_url)!r} (predict with a contour-target model)")
    size = int(np.prod(gt_arr.shape))
    if size > MODES_MAX_VOXELS:
        raise DataError(f"instance modes run on the whole volume in memory: {size} voxels is more than "
                        f"{MODES_MAX_VOXELS}; run label per mode and evaluate its --instances instead")
    try:
        _settings_config(prediction, label_settings)
    except Exception as e:  # a ConfigError naming the field
        raise DataError(f"label_settings: {e}") from e
    return {m: (contour_url if m == "contour" else None) for m in names}


def score_instance_modes(
    gt_arr: Any,
    prediction: str,
    modes: Mapping[str, str | None],
    label_settings: Mapping[str, Any] | None,
    iou_thresholds: Sequence[float],
    storage_options: Mapping[str, Any] | None = None,
    allow_incomplete: bool = False,
    min_gt_size: int = 0,
) -> dict[str, Any]:
    """Each mode's instances (``label``'s ids, computed in memory) scored against ``gt_arr``."""
    from catena_mito.instances import InstanceSettings, instances_whole_volume

    config = _settings_config(prediction, label_settings)
    fg_arr = storage.open_volume(prediction, storage_options)
    fg = np.asarray(fg_arr[...])
    truth = np.asarray(gt_arr[...])
    resolution, _ = storage.read_spatial(fg_arr)
    out: dict[str, Any] = {}
    for mode, contour_url in modes.items():
        contour = None
        if contour_url is not None:
            arr = storage.open_volume(contour_url, storage_options)
            check_input(arr, contour_url, f"contour prediction {storage.redact_url(contour_url)!r}", storage_options,
                        allow_incomplete=allow_incomplete)
            _check_compatible("contour prediction", contour_url, arr, prediction, fg_arr)
            contour = np.asarray(arr[...])
        settings = InstanceSettings.from_config(config, mode, resolution)
        ids = instances_whole_volume(fg, contour, settings)
        table = Contingency()
        table.update(truth, ids)
        out[mode] = {"settings": settings.description() | {"thres_foreground": settings.thres_foreground,
                                                            "thres_small_instances": settings.thres_small_instances},
                     **instance_scores(table.tables(), iou_thresholds, min_gt_size)}
    return out


def _instance_table(title: str, inst: Mapping[str, Any]) -> list[str]:
    lines = [
        "",
        f"{title}  ({inst['n_gt']} ground-truth, {inst['n_pred']} predicted objects)",
        f"  {'IoU >=':>8}{'TP':>8}{'FP':>8}{'FN':>8}{'prec':>8}{'recall':>8}{'F1':>8}{'AP':>8}",
    ]
    for t, row in inst["thresholds"].items():
        lines.append(
            f"  {t:>8}{row['tp']:8d}{row['fp']:8d}{row['fn']:8d}"
            f"{row['precision']:8.4f}{row['recall']:8.4f}{row['f1']:8.4f}{row['ap']:8.4f}"
        )
    lines.append(f"  mean AP (IoU 0.50:0.05:0.95): {inst['mean_ap']:.4f}   AP = TP / (TP + FP + FN)")
    small = inst.get("without_small_truth")
    if small:
        f1 = "  ".join(f"@{t} {row['f1']:.4f}" for t, row in small["thresholds"].items())
        lines.append(
            f"  without the {small['n_gt_ignored']} ground-truth objects under {small['min_gt_size']} voxels "
            f"(and {small['n_pred_ignored']} predictions on them): F1 {f1}, mean AP {small['mean_ap']:.4f}"
        )
    return lines


def format_report(report: Mapping[str, Any]) -> str:
    """A readable table of :func:`evaluate`'s report."""
    lines = [f"ground truth: {report['ground_truth']}  shape {report['shape']} (z, y, x)"]
    sem = report.get("semantic")
    if sem:
        lines += [
            "",
            f"semantic: {sem['prediction']}  (foreground where probability > {sem['threshold']:g})",
            f"  {'':12}{'dice':>8}{'iou':>8}",
            f"  {'foreground':12}{sem['dice']:8.4f}{sem['iou']:8.4f}",
            f"  {'background':12}{sem['background_dice']:8.4f}{sem['background_iou']:8.4f}",
            f"  {'mean':12}{sem['mean_dice']:8.4f}{sem['mean_iou']:8.4f}",
            f"  precision {sem['precision']:.4f}  recall {sem['recall']:.4f}",
        ]
    inst = report.get("instances")
    if inst:
        lines += _instance_table(f"instances: {inst['instances']}", inst)
        lines += format_ranked(inst)
    for mode, scores in (report.get("instance_modes") or {}).items():
        lines += _instance_table(f"instance mode {mode} (from the prediction, label's rule)", scores)
        lines += format_ranked(scores)
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write the report as JSON to any fsspec URL."""
    storage.write_bytes(url, (json.dumps(report, indent=1) + "\n").encode(), storage_options)
