"""``catena-mito train``: one training loop for every backbone.

A run lives under ``<runs_dir>/<exp_name>/`` (any fsspec URL, ``s3://`` included)::

    config.yaml          the resolved TrainConfig (secrets redacted), written first
    metrics.jsonl        one JSON object per epoch: loss, learning rate, time and, at each
                         evaluation, Dice/IoU per validation volume and pooled
    last.pth             after every epoch (what resume_checkpoint usually points at)
    best.pth             the checkpoint with the best pooled validation IoU so far
    epoch_XXXX.pth       every ckpt_interval epochs (XXXX = epochs completed)
    previews/epoch_XXXX.png   raw | label | prediction of one z slice, at each evaluation

Epochs, steps, learning rate
----------------------------
An *epoch* is one pass over the (balanced, subsampled) patch list, in a fresh order, split
between DDP ranks; ``steps_per_epoch`` (beyond the design) fixes the number of
optimisation steps per epoch instead. Adam runs at ``learning_rate`` (AdamW, decoupled
decay, with ``weight_decay`` > 0). ``lr_schedule: step`` (default): with ``hotstart`` the
first :data:`HOTSTART_EPOCHS` (50) epochs use ``learning_rate`` and every later epoch
``learning_rate_after_hotstart_50`` (without ``hotstart`` the second rate is unused).
``poly``/``cosine``: ``warmup_steps`` of linear warm-up, then a per-step decay to 0 at the
last step (:func:`lr_factor_at_step`).

Targets: ``targets: [foreground]`` (default) trains the 2-channel softmax model below.
``targets: [foreground, contour]`` adds each instance's contour (``contour_width`` voxels,
derived once from the whole instance-id volume, :mod:`catena_mito.data`) and makes the
model one sigmoid channel per target (``model_params.out_channels`` follows the targets),
trained with :class:`catena_mito.target_loss.MultiTargetLoss`: per target a batch Dice
plus, for ``DiceCE``, a weighted binary cross-entropy (``loss_weights`` weight the
foreground channel, ``contour_pos_weight`` or a per-batch balance the contour channel).
The checkpoint records ``targets`` and ``contour_width``; ``predict`` reads them.

Loss of one target (:class:`SegmentationLoss`): ``DiceCE`` = foreground Dice pooled over the batch
(nnU-Net's batch Dice; MONAI ``DiceLoss`` with ``include_background=False, batch=True``)
+ cross-entropy weighted by ``loss_weights``; ``DiceLoss`` = the Dice term alone.
``loss_weights: 5.0`` is Catena's foreground factor (``[1, 5]``); a list gives one weight
per class. ``dice_include_background``/``dice_batch`` bring back MONAI's defaults (every
class, per patch), under which an all-background patch predicted right still costs about
0.5.

Validation (``test_zarr_dirs``) runs every ``eval_interval`` epochs and after the last, on
whole volumes, through :func:`catena_mito.inference.sliding_window_predict` - the code
path ``predict`` uses - with the training patch size as window and half of it as step
(predict's defaults), thresholded at 0.5: foreground Dice and IoU and, when the labels are
instance ids (``label_type: mito``, not a binary mask), the instance F1 at IoU 0.5 of the
connected components (26-connected, those under ``val_min_instance_size`` voxels removed;
``label``'s connected-components mode) against the ground-truth ids. With several
targets the foreground scores come from the foreground channel (:func:`catena_mito.
targets.probabilities`), and the Dice/IoU of the contour channel against the contour
target is logged too (``val_contour_dice``/``val_contour_iou``). Without validation
data there is no ``best.pth``.

Training on your own data
-------------------------
* Layout: ``volumes/raw`` (z, y, x; uint8 or any integer/float type, attribute
  ``resolution`` in nm) and ``volumes/labels/mito_ids`` (0 = background) of the same shape.
  Every unlabelled voxel counts as background, so train on crops that are *fully*
  annotated.
* Each dataset is read whole into memory once per run (per process under DDP): crop
  training volumes to what fits in RAM; validation volumes are predicted whole.
* ``patch_size`` must be a multiple of the model's down-sampling factor (16 per axis for
  the default 5-level backbones); validation volumes must be at least one patch large.
* Sparse mitochondria: ``balance_patches: true`` (with ``min_positive_pixels``) and/or
  ``loss_weights: [w_bg, w_fg]``.
* Set ``target_res`` when the data's resolution differs from the one the model should
  work at; ``predict`` reads it (and ``clahe``, the architecture, the patch size) from the
  checkpoint.
* GPU: ``num_workers: 2-4`` keeps augmentation off the training step; ``amp: true`` uses
  bf16 (fp16 with gradient scaling on GPUs without bf16). CPU: ``batch_size >= 2``.
* Serial-section data: ``model_type: rs_unet`` with ``model_params: {variant: xie}`` and
  a thin window (e.g. 18 × 160 × 160); EM defects can be simulated by
  ``missing_section_prob``, ``misalignment_prob``, ``blur_prob`` and ``elastic_prob``.

Checkpoints and resuming
------------------------
Checkpoints follow DESIGN.md (:func:`catena_mito.checkpoint.make_payload`) and carry the
optimiser, scheduler and random-generator states. ``resume_checkpoint`` restores all of
them and continues with the next epoch: on CPU with ``num_workers`` any value, a run of
4 epochs and a run of 2 epochs resumed for 2 more end with bit-identical weights (patch
order and augmentation depend only on ``(seed, epoch, draw)``). ``resume_checkpoint:
auto`` resumes from ``<runs_dir>/<exp_name>/last.pth`` when it exists and starts a new run
otherwise, so a killed and retried job continues by itself. ``model_loc`` only loads
weights (fine-tuning); they must match the model exactly, or the run stops. With
``freeze_encoder`` the encoder parameters
(:func:`catena_mito.models.encoder_parameter_names`) get ``requires_grad=False`` and are
left out of the optimiser; batch-norm running statistics in the encoder still adapt to
the new data (they are buffers, not parameters).

Devices
-------
``device: auto`` uses CUDA when available. With ``amp`` on a CUDA device that supports
bf16, forward passes run under bf16 autocast (no loss scaling needed); on an older GPU
under fp16 autocast with a ``torch.amp.GradScaler`` (its state is saved in the
checkpoint); the loss is computed in float32. On CPU ``amp`` does nothing (logged).
Multi-GPU data parallel::

    torchrun --nproc_per_node=K -m catena_mito train --config train.yaml

initialises a process group when ``WORLD_SIZE > 1`` (NCCL on CUDA, Gloo on CPU), gives
each rank its share of every epoch's patches (``batch_size`` is per rank), and lets only
rank 0 write. The weights start identical (every rank seeds ``seed`` before building the
model, and DDP broadcasts rank 0's); dropout is seeded per ``(seed, rank, epoch)``, so the
ranks draw different masks (augmentation already differs: it depends on the global draw
index). The logged ``train_loss`` is the mean over all ranks' steps (``train_loss_ranks``
holds each rank's). Validation is sharded: rank ``r`` predicts ``test_zarr_dirs[r::K]``
and the confusion and instance counts are pooled over the ranks (with fewer volumes than
ranks some ranks wait). Batch-norm running statistics are averaged over the ranks after
every epoch. At the end the ranks compare checksums of their weights (state dict) and the
result is logged to ``metrics.jsonl``; diverged replicas are an error. On CPU use
``batch_size >= 2``: a batch of one 3-D patch is several times slower per patch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from catena_mito import storage
from catena_mito.config import TrainConfig, save_resolved_config
from catena_mito.data import (
    Augmenter,
    EpochSampler,
    PatchDataset,
    TrainingVolume,
    VolumeCache,
    plan_patches,
)
from catena_mito.errors import CheckpointError, ConfigError
from catena_mito.metrics import ConfusionCounts, confusion_counts

log = logging.getLogger(__name__)

#: With ``hotstart``, epochs ``0 .. HOTSTART_EPOCHS-1`` use ``learning_rate``.
HOTSTART_EPOCHS = 50

__all__ = [
    "HOTSTART_EPOCHS",
    "TrainResult",
    "build_loss",
    "evaluate",
    "learning_rate_at",
    "make_scheduler",
    "preview_png",
    "resolve_device",
    "train",
    "train_step",
]


@dataclass
class TrainResult:
    """What a finished run reports (rank 0 has the full history)."""

    run_url: str
    epochs_completed: int
    best_metric: float | None
    history: list[dict[str, Any]] = field(default_factory=list)


# --- building blocks ------------------------------------------------------------------------


#: ``resume_checkpoint`` value meaning "``<runs_dir>/<exp_name>/last.pth`` if it exists".
AUTO_RESUME = "auto"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without CUDA is a ConfigError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device: 'cuda' was requested but CUDA is not available to torch "
                f"{torch.__version__}; use device: auto or device: cpu"
            )
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device: expected auto, cpu or cuda, got {name!r}")


def learning_rate_at(config: TrainConfig, epoch: int) -> float:
    """The learning rate of (0-based) ``epoch``; see the module docstring for hotstart."""
    if config.hotstart and epoch >= HOTSTART_EPOCHS:
        return config.learning_rate_after_hotstart_50
    return config.learning_rate


def lr_factor_at_step(config: TrainConfig, step: int, total_steps: int) -> float:
    """``poly``/``cosine``: the learning-rate factor of (0-based) optimisation ``step``.

    Linear warm-up over ``warmup_steps`` (factor ``(step + 1) / warmup_steps``), then a decay
    from 1 at the end of warm-up to 0 after the last step: ``(1 - t)^0.9`` (poly, nnU-Net)
    or ``(1 + cos(pi t)) / 2`` (cosine), ``t`` = fraction of the decay steps done.
    """
    warmup = config.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    decay = max(total_steps - warmup, 1)
    t = min(max((step - warmup) / decay, 0.0), 1.0)
    if config.lr_schedule == "poly":
        return (1.0 - t) ** 0.9
    if config.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    raise ConfigError(f"lr_schedule: expected step, poly or cosine, got {config.lr_schedule!r}")


def scheduler_steps_per_batch(config: TrainConfig) -> bool:
    """True when the schedule advances every optimisation step (poly, cosine), False when
    it advances once per epoch (step)."""
    return config.lr_schedule != "step"


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int = 1
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of ``config``.

    ``step``: a per-epoch schedule (step it once after each epoch) following
    :func:`learning_rate_at`. ``poly``/``cosine``: a per-step schedule (step it after every
    optimisation step) following :func:`lr_factor_at_step` over ``epochs * steps_per_epoch``.
    """
    base = config.learning_rate
    if not scheduler_steps_per_batch(config):
        def factor(epoch: int) -> float:
            return learning_rate_at(config, epoch) / base
    else:
        total = config.epochs * steps_per_epoch

        def factor(step: int) -> float:
            return lr_factor_at_step(config, step, total)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(params: Sequence[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """Adam at ``learning_rate``; AdamW (decoupled decay) when ``weight_decay`` > 0."""
    if config.weight_decay > 0:
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.learning_rate)


class SegmentationLoss(nn.Module):
    """Dice (+ weighted cross-entropy) on ``(N, C, z, y, x)`` logits and ``(N, 1, z, y, x)``
    integer targets.

    * Dice: MONAI ``DiceLoss`` on the softmax with one-hot targets; by default over the
      foreground classes only (``include_background=False``) and with the counts pooled
      over the whole batch (``batch=True``, nnU-Net's batch Dice), so a confidently correct
      all-background patch costs nothing instead of 0.5.
    * Cross-entropy (``DiceCE``): ``torch.nn.functional.cross_entropy`` with the class
      weights (a weighted mean over voxels).

    ``class_weights`` weight the cross-entropy, and the per-class Dice terms when the
    background is included (with one foreground class there is nothing to weight in a
    foreground-only Dice).
    """

    def __init__(
        self,
        loss_type: str,
        class_weights: torch.Tensor | None,
        *,
        include_background: bool = False,
        batch: bool = True,
    ) -> None:
        from monai.losses import DiceLoss

        super().__init__()
        self.loss_type = loss_type
        self.dice = DiceLoss(
            include_background=include_background, to_onehot_y=True, softmax=True, batch=batch,
            weight=class_weights if include_background else None,
        )
        self.register_buffer("class_weights", class_weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.dice(logits, target)
        if self.loss_type == "DiceCE":
            loss = loss + nn.functional.cross_entropy(logits, target[:, 0].long(), weight=self.class_weights)
        return loss


def class_weights(loss_weights: float | Sequence[float] | None, num_classes: int) -> list[float] | None:
    """``loss_weights`` as one weight per class: a number ``w`` is the foreground factor
    (``[1, w]``, every non-background class ``w``), a list is taken as it is.

    Raises:
        ConfigError: a list that does not have one value per class.
    """
    if loss_weights is None:
        return None
    if isinstance(loss_weights, (int, float)) and not isinstance(loss_weights, bool):
        return [1.0] + [float(loss_weights)] * (num_classes - 1)
    weights = [float(w) for w in loss_weights]
    if len(weights) != num_classes:
        raise ConfigError(
            f"loss_weights: expected one number (the foreground factor) or {num_classes} values "
            f"(one per class: background, foreground), got {list(loss_weights)}"
        )
    return weights


def build_loss(
    loss_type: str,
    loss_weights: float | Sequence[float] | None,
    num_classes: int,
    *,
    include_background: bool = False,
    batch: bool = True,
    targets: Sequence[str] = ("foreground",),
    contour_pos_weight: float | None = None,
) -> nn.Module:
    """The training loss of ``loss_type`` (``DiceCE`` or ``DiceLoss``): :class:`SegmentationLoss`
    for one target, :class:`catena_mito.target_loss.MultiTargetLoss` for several
    (``loss_weights`` then weight the foreground channel's cross-entropy, ``num_classes``
    is unused: every channel is binary).

    Raises:
        ConfigError: unknown ``loss_type``, ``loss_weights`` not one per class, or class
        weights that would have nothing to weight (``DiceLoss`` with a foreground-only Dice).
    """
    from catena_mito.targets import validate_targets

    if loss_type not in ("DiceLoss", "DiceCE"):
        raise ConfigError(f"loss_type: expected 'DiceLoss' or 'DiceCE', got {loss_type!r}")
    targets = validate_targets(targets)
    if len(targets) > 1:
        return _multi_target_loss(loss_type, loss_weights, targets, include_background=include_background,
                                  batch=batch, contour_pos_weight=contour_pos_weight)
    weights = class_weights(loss_weights, num_classes)
    if weights is not None and loss_type == "DiceLoss" and not include_background:
        raise ConfigError(
            "loss_weights: with loss_type DiceLoss and a foreground-only Dice there is no class to "
            "weight; use loss_type DiceCE (weighted cross-entropy) or dice_include_background: true"
        )
    tensor = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
    return SegmentationLoss(loss_type, tensor, include_background=include_background, batch=batch)


def _multi_target_loss(
    loss_type: str,
    loss_weights: float | Sequence[float] | None,
    targets: Sequence[str],
    *,
    include_background: bool,
    batch: bool,
    contour_pos_weight: float | None,
) -> nn.Module:
    from catena_mito.target_loss import MultiTargetLoss

    if include_background:
        raise ConfigError(
            "dice_include_background applies to the single-target softmax model; with several "
            "targets each sigmoid channel has a Dice of its positive class only"
        )
    weights = class_weights(loss_weights, 2)
    if loss_type == "DiceLoss" and (weights is not None or contour_pos_weight is not None):
        raise ConfigError(
            "loss_weights/contour_pos_weight weight the cross-entropy, which loss_type DiceLoss "
            "does not have; use loss_type DiceCE"
        )
    return MultiTargetLoss(loss_type, targets, foreground_weights=weights,
                           contour_pos_weight=contour_pos_weight, batch=batch)


def model_params_for(config: TrainConfig) -> dict[str, Any]:
    """The backbone hyper-parameters of ``config``: ``model_params`` with the output channels
    the targets need (several targets: one channel each; one target: as given, 2 by default,
    so single-target runs build exactly the model they always did)."""
    from catena_mito.targets import out_channels

    params = dict(config.model_params)
    if len(config.targets) > 1:
        params["out_channels"] = out_channels(config.targets)
    return params


def _bf16_supported() -> bool:
    """Whether the current CUDA device runs bf16 (a function, so tests can fake it)."""
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device``: bf16 on a CUDA device that supports it,
    fp16 on older CUDA devices (with a GradScaler), None (full float32) on CPU or without amp."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if _bf16_supported() else torch.float16


def make_grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 autocast (bf16 has float32's range and needs none), else None."""
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def autocast(device: torch.device, amp: bool | torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast with :func:`amp_dtype` (or the dtype given); otherwise nothing."""
    dtype = amp if isinstance(amp, torch.dtype) else amp_dtype(device, bool(amp))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(
    model: nn.Module,
    image: torch.Tensor,
    label: torch.Tensor,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    amp: bool | torch.dtype | None = False,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One optimisation step on a batch ``(N, 1, z, y, x)``; returns the detached loss.

    ``amp``: True (dtype from :func:`amp_dtype`) or an autocast dtype; ``scaler``: the
    GradScaler of fp16 autocast (the loss is scaled, the step skipped on inf/NaN gradients).
    """
    image = image.to(device, non_blocking=True)
    label = label.to(device, non_blocking=True).long()
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, amp):
        logits = model(image)
    loss = loss_fn(logits.float(), label)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def instance_f1_counts(prob: np.ndarray, ids: np.ndarray, *, threshold: float = 0.5,
                       min_size: int = 0, iou: float = 0.5) -> dict[str, int]:
    """Instance matches of one volume: connected components (26-connected, ``label``'s
    default) of ``prob > threshold`` without those under ``min_size`` voxels, against the
    ground-truth ``ids``, one-to-one at IoU >= ``iou``
    (:func:`catena_mito.instance_metrics.instance_scores`). Returns ``tp``, ``fp``, ``fn``."""
    from scipy import ndimage

    from catena_mito.instance_metrics import Contingency, instance_scores

    pred, _ = ndimage.label(prob > threshold, structure=np.ones((3, 3, 3), dtype=bool))
    if min_size > 0 and pred.max() > 0:
        sizes = np.bincount(pred.ravel())
        small = sizes < min_size
        small[0] = False
        pred[small[pred]] = 0
    table = Contingency()
    table.update(ids, pred)
    at = instance_scores(table.tables(), (iou,))["thresholds"][f"{iou:g}"]
    return {"tp": int(at["tp"]), "fp": int(at["fp"]), "fn": int(at["fn"])}


def _f1(tp: int, fp: int, fn: int) -> float:
    den = 2 * tp + fp + fn
    return 1.0 if den == 0 else 2 * tp / den


def evaluate(
    model: nn.Module,
    volumes: Sequence[TrainingVolume],
    patch_size: Sequence[int],
    *,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    amp: bool = False,
    min_instance_size: int = 0,
    targets: Sequence[str] = ("foreground",),
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Full-volume sliding-window Dice/IoU of ``model`` on ``volumes``.

    Returns the metrics (``val_dice``/``val_iou`` pooled over all volumes, and per volume;
    ``val_instance_f1`` pooled over the volumes with instance ids, see
    :func:`instance_f1_counts`) and the foreground probability of the first volume,
    (z, y, x), for the preview. Per volume, ``counts`` holds the confusion and instance
    counts, so results of several processes can be pooled (:func:`pool_metrics`).
    With several ``targets`` the foreground is the model's foreground channel, and
    volumes with a contour target also get the contour channel's Dice/IoU
    (``val_contour_dice``/``val_contour_iou``).
    """
    from catena_mito.targets import validate_targets

    targets = validate_targets(targets)
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    per_volume: dict[str, dict[str, Any]] = {}
    first_prob = None
    try:
        for vol in volumes:
            probs = target_probabilities(net, vol.raw, patch_size, targets, batch_size=batch_size,
                                         device=device, amp=amp)
            prob = probs["foreground"]
            counts = confusion_counts(prob > 0.5, vol.label)
            entry: dict[str, Any] = {"dice": counts.dice, "iou": counts.iou,
                                     "counts": {"tp": int(counts.tp), "fp": int(counts.fp), "fn": int(counts.fn)}}
            if "contour" in probs and vol.contour is not None:
                rim = confusion_counts(probs["contour"] > 0.5, vol.contour)
                entry["contour_dice"], entry["contour_iou"] = rim.dice, rim.iou
                entry["counts"]["contour"] = {"tp": int(rim.tp), "fp": int(rim.fp), "fn": int(rim.fn)}
            if vol.ids is not None:
                inst = instance_f1_counts(prob, vol.ids, min_size=min_instance_size)
                entry["instance_f1"] = _f1(**inst)
                entry["counts"]["instances"] = inst
            per_volume[vol.url] = entry
            if first_prob is None:
                first_prob = prob
    finally:
        net.train(was_training)
    return pool_metrics(per_volume), first_prob


def pool_metrics(per_volume: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Pooled ``val_dice``/``val_iou`` (and ``val_instance_f1``) from per-volume counts."""
    tp = sum(v["counts"]["tp"] for v in per_volume.values())
    fp = sum(v["counts"]["fp"] for v in per_volume.values())
    fn = sum(v["counts"]["fn"] for v in per_volume.values())
    total = ConfusionCounts(tp=tp, fp=fp, fn=fn)
    out: dict[str, Any] = {"val_dice": total.dice, "val_iou": total.iou, "val_volumes": per_volume}
    inst = [v["counts"]["instances"] for v in per_volume.values() if "instances" in v["counts"]]
    if inst:
        out["val_instance_f1"] = _f1(*(sum(c[k] for c in inst) for k in ("tp", "fp", "fn")))
    rims = [v["counts"]["contour"] for v in per_volume.values() if "contour" in v["counts"]]
    if rims:
        rim = ConfusionCounts(**{k: sum(c[k] for c in rims) for k in ("tp", "fp", "fn")})
        out["val_contour_dice"], out["val_contour_iou"] = rim.dice, rim.iou
    return out


def target_probabilities(
    net: nn.Module,
    raw: np.ndarray,
    patch_size: Sequence[int],
    targets: Sequence[str],
    *,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    amp: bool = False,
    tta: str = "none",
) -> dict[str, np.ndarray]:
    """Whole-volume sliding-window probabilities (z, y, x) of every target, by name.

    Through :func:`catena_mito.inference.sliding_window_predict`, predict's code path, with
    the training patch as window and predict's default stride; every target from one
    forward pass per window (per flip with ``tta="flips"``, as predict's ``tta``).
    """
    from catena_mito.inference import sliding_window_predict
    from catena_mito.targets import validate_targets

    targets = validate_targets(targets)
    probs = sliding_window_predict(net, raw, tuple(patch_size), None,  # None: predict's default stride
                                   batch_size=batch_size, device=str(device), amp=amp, tta=tta, targets=targets)
    if len(targets) == 1:
        return {targets[0]: probs}
    return {name: probs[c] for c, name in enumerate(targets)}


def preview_png(raw: np.ndarray, label: np.ndarray, prob: np.ndarray, min_height: int = 256) -> bytes:
    """A PNG of one slice, side by side: raw | label | prediction (2-D arrays, y, x).

    ``raw`` is stretched to its own min-max, ``label`` shown as black/white, ``prob`` as
    grey levels 0-1; small slices are enlarged (nearest neighbour) to ``min_height``.
    """
    from PIL import Image

    def grey(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
        a = np.asarray(a, dtype=np.float32)
        return (np.clip((a - lo) / max(hi - lo, 1e-12), 0.0, 1.0) * 255.0).astype(np.uint8)

    panels = [
        grey(raw, float(np.min(raw)), float(np.max(raw))),
        grey(label, 0.0, 1.0),
        grey(prob, 0.0, 1.0),
    ]
    height, width = panels[0].shape
    gap = np.full((height, max(1, width // 32)), 128, dtype=np.uint8)
    image = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)
    scale = max(1, -(-min_height // height))
    pil = Image.fromarray(image, mode="L")
    if scale > 1:
        pil = pil.resize((image.shape[1] * scale, height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def _preview_slice(volume: TrainingVolume) -> int:
    """The z slice with the most foreground (the middle one when there is none)."""
    counts = volume.label.reshape(volume.label.shape[0], -1).sum(axis=1)
    return int(np.argmax(counts)) if counts.max() > 0 else volume.label.shape[0] // 2


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's global generator and python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def weights_checksum(model: nn.Module) -> str:
    """SHA-256 of every tensor of the state dict (names and bytes), for comparing replicas."""
    digest = hashlib.sha256()
    for name, tensor in _unwrap(model).state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --- distributed ----------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


@contextlib.contextmanager
def _distributed(device_name: str) -> Iterator[tuple[_Dist, torch.device]]:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE > 1``)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size <= 1:
        yield _Dist(), device
        return
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    log.info("DDP rank %d/%d (%s, %s)", rank, world_size, backend, device)
    try:
        yield _Dist(rank=rank, local_rank=local_rank, world_size=world_size), device
    finally:
        dist.destroy_process_group()


# --- the run --------------------------------------------------------------------------------


class _RunWriter:
    """Writes a run's files (rank 0 only; other ranks get a writer that writes nothing)."""

    def __init__(self, run_url: str, config: TrainConfig, active: bool) -> None:
        self.run_url = run_url
        self.config = config
        self.active = active
        self.options = storage.resolve_storage_options(run_url, config.storage_options)
        self.history: list[dict[str, Any]] = []

    def url(self, *parts: str) -> str:
        return storage.join_url(self.run_url, *parts)

    def load_history(self, up_to_epoch: int) -> None:
        """Keep the metrics of epochs ``<= up_to_epoch`` from a run being resumed."""
        url = self.url("metrics.jsonl")
        if not self.active or not storage.exists(url, self.options):
            return
        lines = storage.read_bytes(url, self.options).decode().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        self.history = [r for r in records if r.get("epoch", 0) <= up_to_epoch]

    def log_metrics(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.active:
            # Rewritten whole: object stores have no append, and the file is small.
            text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.history)
            storage.write_bytes(self.url("metrics.jsonl"), text.encode(), self.options)

    def save_config(self) -> None:
        if self.active:
            save_resolved_config(self.config, self.url("config.yaml"), self.options)

    def save_checkpoint(self, names: Sequence[str], payload: dict[str, Any]) -> None:
        from catena_mito.checkpoint import save_checkpoint

        if self.active:
            for name in names:
                save_checkpoint(self.url(name), payload, self.options)

    def save_preview(self, epoch: int, data: bytes) -> None:
        if self.active:
            storage.write_bytes(self.url("previews", f"epoch_{epoch:04d}.png"), data, self.options)


def resolve_auto_resume(config: TrainConfig, run_url: str) -> TrainConfig:
    """``resume_checkpoint: auto``: resume from ``<run_url>/last.pth`` when it exists, else
    start fresh, so a retried or rescheduled pod continues without anyone editing the config."""
    if config.resume_checkpoint != AUTO_RESUME:
        return config
    last = storage.join_url(run_url, "last.pth")
    if storage.exists(last, storage.resolve_storage_options(last, config.storage_options)):
        log.info("resume_checkpoint auto: resuming from %s", storage.redact_url(last))
        return config.model_copy(update={"resume_checkpoint": last})
    log.info("resume_checkpoint auto: no %s yet, starting a new run", storage.redact_url(last))
    return config.model_copy(update={"resume_checkpoint": None})


def _check_fresh_run(config: TrainConfig, run_url: str) -> None:
    """Refuse to overwrite a finished or running run unless it is being resumed."""
    options = storage.resolve_storage_options(run_url, config.storage_options)
    last = storage.join_url(run_url, "last.pth")
    if config.resume_checkpoint is None and storage.exists(last, options):
        raise ConfigError(
            f"run directory {storage.redact_url(run_url)!r} already holds a run ({'last.pth'}); "
            f"set resume_checkpoint: {storage.redact_url(last)} (or auto) to continue it, or choose "
            "another exp_name/runs_dir"
        )


def _load_checkpoint_for(config: TrainConfig, url: str, field_name: str) -> dict[str, Any]:
    from catena_mito.checkpoint import load_checkpoint
    from catena_mito.targets import checkpoint_targets

    ckpt = load_checkpoint(url, storage.resolve_storage_options(url, config.storage_options), map_location="cpu")
    if ckpt["model_type"] != config.model_type:
        raise CheckpointError(
            f"{field_name}: {storage.redact_url(url)} holds a {ckpt['model_type']!r} model but "
            f"model_type is {config.model_type!r}"
        )
    # Another target set means another output layer: say so, not "shape mismatch" of a tensor.
    if list(checkpoint_targets(ckpt)) != list(config.targets):
        raise CheckpointError(
            f"{field_name}: {storage.redact_url(url)} was trained for targets "
            f"{list(checkpoint_targets(ckpt))} but targets is {list(config.targets)}"
        )
    return ckpt


def _load_weights(model: nn.Module, ckpt: dict[str, Any], url: str, field_name: str) -> None:
    from catena_mito.checkpoint import load_weights_into

    try:
        report = load_weights_into(model, ckpt, strict=True)
    except CheckpointError as e:
        raise CheckpointError(f"{field_name}: {storage.redact_url(url)}: {e}") from e
    log.info("%s: loaded %d tensors from %s", field_name, len(report.loaded), storage.redact_url(url))


def freeze_encoder(model: nn.Module, model_type: str) -> set[str]:
    """Set ``requires_grad=False`` on exactly the encoder parameters; return their names."""
    from catena_mito.models import encoder_parameter_names

    names = encoder_parameter_names(model, model_type)
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(False)
    log.info("freeze_encoder: %d encoder parameter tensors frozen", len(names))
    return names


def train(config: TrainConfig) -> TrainResult:
    """Train ``config.model_type`` on ``config.train_zarr_dirs``; see the module docstring.

    Raises:
        ConfigError: invalid combination (patch size vs model, loss weights, device,
        an existing run without resume_checkpoint).
        CheckpointError: ``model_loc``/``resume_checkpoint`` missing or not matching.
        StorageError, DataError: unreadable or inconsistent datasets.
    """
    from catena_mito.checkpoint import load_pretrained
    from catena_mito.models import build_model, check_patch_size

    run_url = storage.join_url(config.runs_dir, config.exp_name)
    config = resolve_auto_resume(config, run_url)
    check_patch_size(config.model_type, model_params_for(config), config.patch_size)
    _check_fresh_run(config, run_url)

    with _distributed(config.device) as (dist_info, device):
        seed_everything(config.seed)  # the same on every rank: identical initial weights
        writer = _RunWriter(run_url, config, active=dist_info.main)
        dtype = amp_dtype(device, config.amp)
        if config.amp and dtype is None:
            log.info("amp: no effect on %s (mixed precision runs on CUDA only); training in float32", device.type)
        elif dtype is not None:
            log.info("amp: %s autocast%s", str(dtype).removeprefix("torch."),
                     " with gradient scaling (this GPU has no bf16)" if dtype == torch.float16 else "")
        if config.freeze_encoder and not config.model_loc and not config.resume_checkpoint:
            log.warning("freeze_encoder is set without model_loc: the encoder keeps its *random* initial "
                        "weights and only the decoder learns; set model_loc to a pre-trained checkpoint")

        # Data: every dataset read once, preprocessed like predict. Validation is sharded:
        # rank r evaluates test_zarr_dirs[r::world_size] (and reads only those).
        val_urls = list(config.test_zarr_dirs)[dist_info.rank :: dist_info.world_size]
        cache = VolumeCache(
            config.label_type, original_res=config.original_res, target_res=config.target_res,
            clahe=config.clahe, storage_options=config.storage_options, keep_ids_for=val_urls,
            contour_width=config.contour_width if "contour" in config.targets else None,
        )
        val_volumes = [cache.get(url) for url in val_urls]
        train_volumes = [cache.get(url) for url in config.train_zarr_dirs]
        if not config.test_zarr_dirs:
            log.warning("no test_zarr_dirs: no validation, no best.pth")
        patches = plan_patches(
            train_volumes, config.patch_size, config.stride,
            balance_patches=config.balance_patches, min_positive_pixels=config.min_positive_pixels,
            negative_patch_weight=config.negative_patch_weight,
            subsample_frac=config.subsample_frac, subsample_number=config.subsample_number,
            subsample_seed=config.subsample_seed,
        )
        augmenter = Augmenter(
            config.rotation_augs, config.contrast_augs, missing_section=config.missing_section_prob,
            misalignment=config.misalignment_prob, blur=config.blur_prob, elastic=config.elastic_prob,
        )
        dataset = PatchDataset(train_volumes, patches, config.patch_size, augmenter, seed=config.seed,
                               targets=config.targets)
        sampler = EpochSampler(
            len(patches), seed=config.seed, rank=dist_info.rank, world_size=dist_info.world_size,
            draws_per_rank=config.steps_per_epoch * config.batch_size if config.steps_per_epoch else None,
            weights=[p.weight for p in patches],
        )
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=config.batch_size, sampler=sampler,
            num_workers=config.num_workers, pin_memory=device.type == "cuda",
            persistent_workers=config.num_workers > 0, drop_last=False,
            # The loader draws worker seeds from this generator, not from the global one that
            # dropout uses, so resuming (with workers started at another epoch) stays exact.
            # Augmentation does not use worker seeds: it depends on (seed, epoch, draw) only.
            generator=torch.Generator().manual_seed(config.seed),
        )

        # Model, optimiser, schedule; weights from model_loc or the resumed run.
        model = build_model(config.model_type, **model_params_for(config))
        resume = None
        if config.resume_checkpoint:
            resume = _load_checkpoint_for(config, config.resume_checkpoint, "resume_checkpoint")
            _load_weights(model, resume, config.resume_checkpoint, "resume_checkpoint")
            if config.model_loc:
                log.info("resume_checkpoint given: model_loc is not reloaded (the resumed weights include it)")
        elif config.model_loc:
            load_pretrained(model, config.model_loc, storage.resolve_storage_options(config.model_loc, config.storage_options),
                            model_type=config.model_type, targets=config.targets, strict=config.model_loc_strict)
        if config.freeze_encoder:
            freeze_encoder(model, config.model_type)
        model.to(device)
        loss_fn = build_loss(
            config.loss_type, config.loss_weights, _num_classes(config),
            include_background=config.dice_include_background, batch=config.dice_batch,
            targets=config.targets, contour_pos_weight=config.contour_pos_weight,
        ).to(device)
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config)
        scheduler = make_scheduler(optimizer, config, len(loader))
        scaler = make_grad_scaler(device, dtype)
        start_epoch, best = 0, None
        if resume is not None:
            try:
                optimizer.load_state_dict(resume["optimizer"])
                scheduler.load_state_dict(resume["scheduler"])
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(
                    f"resume_checkpoint: {storage.redact_url(config.resume_checkpoint or '')}: "
                    f"optimizer/scheduler state does not fit this config ({e}); was "
                    "freeze_encoder, weight_decay or the model changed?"
                ) from e
            if scaler is not None and resume.get("grad_scaler"):
                scaler.load_state_dict(resume["grad_scaler"])
            start_epoch, best = int(resume["epoch"]), resume["best_metric"]
            writer.load_history(start_epoch)
            log.info("resuming after epoch %d (best metric %s)", start_epoch, best)
        if dist_info.enabled:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
            )
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed patch shape: pick the fastest kernels once
        writer.save_config()
        if resume is not None and "rng" in resume:
            from catena_mito.checkpoint import restore_rng_state

            # Last, after everything that draws random numbers during setup (model init).
            restore_rng_state(resume["rng"])

        result = _loop(
            config, model, loader, sampler, loss_fn, optimizer, scheduler, device,
            dist_info, writer, val_volumes, start_epoch, best, scaler,
        )
        if dist_info.enabled:
            _check_replicas(model, dist_info, writer)
        return result


def _num_classes(config: TrainConfig) -> int:
    from catena_mito.models import resolve_model_params

    return int(resolve_model_params(config.model_type, model_params_for(config))["out_channels"])


def _loop(
    config: TrainConfig,
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    sampler: EpochSampler,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    device: torch.device,
    dist_info: _Dist,
    writer: _RunWriter,
    val_volumes: Sequence[TrainingVolume],
    start_epoch: int,
    best: float | None,
    scaler: torch.amp.GradScaler | None = None,
) -> TrainResult:
    from tqdm import tqdm

    from catena_mito.checkpoint import capture_rng_state, make_payload

    steps_per_epoch = len(loader)
    if start_epoch >= config.epochs:
        log.warning("the resumed run already completed %d of epochs=%d: nothing to train", start_epoch, config.epochs)
    progress = tqdm(
        total=(config.epochs - start_epoch) * steps_per_epoch, unit="step", desc="train",
        disable=not dist_info.main, mininterval=1.0, dynamic_ncols=True,
    )
    model.train()
    completed = start_epoch
    dtype = amp_dtype(device, config.amp)
    per_step = scheduler_steps_per_batch(config)
    try:
        for epoch in range(start_epoch, config.epochs):
            sampler.set_epoch(epoch)
            # Dropout (the global torch generator) is seeded per (seed, rank, epoch): the
            # ranks draw different masks, and a resumed run draws what the straight one did.
            torch.manual_seed(epoch_seed(config.seed, dist_info.rank, epoch))
            lr = optimizer.param_groups[0]["lr"]
            started = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            steps = 0
            for image, label in loader:
                loss_sum += train_step(model, image, label, loss_fn, optimizer, device, dtype, scaler)
                steps += 1
                if per_step:
                    scheduler.step()
                progress.update(1)
                if steps % 10 == 0:
                    progress.set_postfix(epoch=epoch + 1, loss=f"{loss_sum.item() / steps:.4f}")
            if not per_step:
                scheduler.step()
            done = completed = epoch + 1
            record: dict[str, Any] = {
                "epoch": done, "train_loss": loss_sum.item() / max(steps, 1), "lr": lr,
                "steps": steps, "time_s": round(time.perf_counter() - started, 3),
            }
            if dist_info.enabled:
                _average_buffers(model, dist_info)
                # The logged loss is the mean over every rank's steps, not rank 0's alone.
                ranks = _gather_losses(loss_sum, steps, device, dist_info)
                record["train_loss"] = sum(total for total, _ in ranks) / max(sum(n for _, n in ranks), 1)
                record["train_loss_ranks"] = [total / max(n, 1) for total, n in ranks]
            evaluate_now = bool(config.test_zarr_dirs) and (done % config.eval_interval == 0 or done == config.epochs)
            improved = False
            if evaluate_now:
                metrics, prob = evaluate(
                    model, val_volumes, config.patch_size, batch_size=config.batch_size,
                    device=device, amp=config.amp, min_instance_size=config.val_min_instance_size,
                    targets=config.targets,
                )
                if dist_info.enabled:
                    metrics = _gather_metrics(metrics, config.test_zarr_dirs, dist_info)
                record.update(metrics)
                improved = best is None or metrics["val_iou"] > best
                if improved:
                    best = metrics["val_iou"]
                if dist_info.main and val_volumes and prob is not None:
                    # Rank 0 validates test_zarr_dirs[0]: the preview is of that volume.
                    z = _preview_slice(val_volumes[0])
                    writer.save_preview(done, preview_png(val_volumes[0].raw[z], val_volumes[0].label[z], prob[z]))
                inst = f", val instance F1 {metrics['val_instance_f1']:.4f}" if "val_instance_f1" in metrics else ""
                if "val_contour_iou" in metrics:
                    inst += f", val contour IoU {metrics['val_contour_iou']:.4f}"
                if dist_info.main:
                    progress.write(
                        f"epoch {done}: loss {record['train_loss']:.4f}, val dice "
                        f"{metrics['val_dice']:.4f}, val IoU {metrics['val_iou']:.4f}{inst}",
                        file=sys.stderr,
                    )
            record["best_val_iou"] = best
            writer.log_metrics(record)
            if dist_info.main:
                payload = make_payload(
                    config.model_type, model_params_for(config), _unwrap(model), optimizer, scheduler,
                    epoch=done, best_metric=best, config=config.redacted_dict(),
                    rng=capture_rng_state(), targets=config.targets,
                    contour_width=config.contour_width if "contour" in config.targets else None,
                )
                if scaler is not None:
                    payload["grad_scaler"] = scaler.state_dict()
                names = ["last.pth"]
                if improved:
                    names.append("best.pth")
                if done % config.ckpt_interval == 0:
                    names.append(f"epoch_{done:04d}.pth")
                writer.save_checkpoint(names, payload)
            dist_info.barrier()  # no rank starts the next epoch before the checkpoint exists
    finally:
        progress.close()
    return TrainResult(
        run_url=writer.run_url, epochs_completed=completed, best_metric=best,
        history=list(writer.history),
    )


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The torch seed of one rank's epoch (dropout): a hash of ``(seed, rank, epoch)``."""
    return int(np.random.SeedSequence([seed % 2**32, rank, epoch]).generate_state(1, np.uint64)[0] % 2**63)


def _gather_losses(loss_sum: torch.Tensor, steps: int, device: torch.device, dist_info: _Dist) -> list[tuple[float, int]]:
    """Every rank's (summed loss, steps) of the epoch, all_gather'ed (rank order)."""
    import torch.distributed as dist

    mine = torch.stack([loss_sum.detach().double(), torch.tensor(float(steps), device=device, dtype=torch.float64)])
    gathered = [torch.zeros_like(mine) for _ in range(dist_info.world_size)]
    dist.all_gather(gathered, mine)
    return [(float(t[0]), int(t[1])) for t in gathered]


def _gather_metrics(metrics: dict[str, Any], urls: Sequence[str], dist_info: _Dist) -> dict[str, Any]:
    """Pool the validation of every rank (each evaluated its shard of ``urls``)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(gathered, metrics["val_volumes"])
    per_volume: dict[str, dict[str, Any]] = {}
    for rank, volumes in enumerate(gathered):
        for url, entry in volumes.items():
            per_volume[url] = {**entry, "rank": rank}
    order = {storage.redact_url(u): i for i, u in enumerate(urls)}
    per_volume = dict(sorted(per_volume.items(), key=lambda kv: order.get(kv[0], len(order))))
    return pool_metrics(per_volume)


def _average_buffers(model: nn.Module, dist_info: _Dist) -> None:
    """Average floating-point buffers (batch-norm running statistics) over the ranks.

    DDP keeps parameters in sync, but each rank's last forward pass updates its own
    running statistics; averaging them makes every replica (and the checkpoint) the same
    and uses the statistics of all ranks' data.
    """
    import torch.distributed as dist

    for buffer in _unwrap(model).buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(dist_info.world_size)


def _check_replicas(model: nn.Module, dist_info: _Dist, writer: _RunWriter) -> None:
    """All ranks must end with identical weights; log the checksums (rank 0 writes them)."""
    import torch.distributed as dist

    mine = weights_checksum(model)
    gathered: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(gathered, mine)
    in_sync = len(set(gathered)) == 1
    writer.log_metrics({"event": "ddp_replicas", "world_size": dist_info.world_size, "checksums": gathered, "in_sync": in_sync})
    if not in_sync:
        raise RuntimeError(f"DDP replicas diverged: weight checksums per rank {gathered}")
