"""The training loss of a model with several targets: one sigmoid channel per target.

A single-target model keeps its 2-channel softmax loss (``train.SegmentationLoss``). With
several targets (:mod:`catena_mito.targets`) each channel ``t`` is a binary problem of its
own, and the loss is the sum over the targets of

* a batch Dice of the channel's positive class, ``1 - (2 Σ p y + ε) / (Σ p + Σ y + ε)``
  with ``p = sigmoid(logit)``, ``ε = 1e-5`` (MONAI's smoothing), the sums pooled over the
  whole batch (nnU-Net's batch Dice; ``dice_batch: false``: the mean of per-patch Dice);
* with ``DiceCE``, a weighted binary cross-entropy ``Σ w·bce / Σ w`` (a weighted mean
  over voxels, as the single-target cross-entropy with class weights):

  - ``foreground``: ``w`` = the foreground / background weight of ``loss_weights``
    (1 and 1 without them), the single-target model's class weighting;
  - ``contour``: a contour voxel weighs ``contour_pos_weight``, a non-contour voxel 1. By
    default the weight balances the classes of the batch as pytorch_connectomics'
    ``weight_binary_ratio`` does for its MitoEM contour channel (weighted BCE + Dice): for
    a positive fraction ``r`` clipped to [0.05, 0.95] the rarer class weighs
    ``max(r, 1-r) / min(r, 1-r)`` (so at most 19), a batch of one class weighs 1. The
    contour is a thin rim, a few per cent of the voxels: unweighted, predicting "no
    contour" everywhere is nearly free and the seeds of touching objects never separate.

This is the per-channel recipe of pytorch_connectomics' MitoEM configs (a binary
foreground and an instance-contour channel, each ``WeightedBCEWithLogitsLoss`` +
``DiceLoss``), with the foreground weighted as this project always has.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from catena_mito.errors import ConfigError
from catena_mito.targets import CONTOUR, FOREGROUND, validate_targets

#: MONAI DiceLoss's default smoothing of numerator and denominator.
DICE_SMOOTH = 1e-5
#: pytorch_connectomics' clipping of the positive fraction in its class rebalancing.
MIN_RATIO = 0.05


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, *, batch: bool = True) -> torch.Tensor:
    """``1 - Dice`` of probabilities and a {0, 1} target, both ``(N, ...)``: pooled over the
    batch (``batch``) or the mean of per-sample values."""
    dims = tuple(range(0 if batch else 1, prob.ndim))
    inter = (prob * target).sum(dim=dims)
    denom = prob.sum(dim=dims) + target.sum(dim=dims)
    return (1.0 - (2.0 * inter + DICE_SMOOTH) / (denom + DICE_SMOOTH)).mean()


def balanced_weights(target: torch.Tensor) -> torch.Tensor:
    """Voxel weights that balance a binary target's two classes (``weight_binary_ratio``).

    The rarer class weighs ``max(r, 1-r) / min(r, 1-r)`` for the positive fraction ``r``
    clipped to [:data:`MIN_RATIO`, 1 - :data:`MIN_RATIO`], the other 1; all 1 when the
    target holds one class only. No gradient flows through the weights.
    """
    target = target.detach()
    if bool(target.max() == target.min()):
        return torch.ones_like(target)
    r = target.mean().clamp(MIN_RATIO, 1.0 - MIN_RATIO)
    factor = torch.maximum(r, 1 - r) / torch.minimum(r, 1 - r)
    rare = target if bool(r < 0.5) else 1 - target
    return 1.0 + (factor - 1.0) * rare


def weighted_bce(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ w·bce / Σ w`` of logits against a {0, 1} target (a weighted mean over voxels)."""
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (weights * bce).sum() / weights.sum()


class MultiTargetLoss(nn.Module):
    """The loss of ``(N, T, z, y, x)`` logits against ``(N, T, z, y, x)`` {0, 1} targets,
    one channel per target of ``targets`` (see the module docstring).

    ``foreground_weights``: ``(background, foreground)`` weights of the foreground
    channel's cross-entropy, or None; ``contour_pos_weight``: the contour voxels' weight,
    None for the per-batch balance.
    """

    def __init__(
        self,
        loss_type: str,
        targets: Sequence[str],
        *,
        foreground_weights: Sequence[float] | None = None,
        contour_pos_weight: float | None = None,
        batch: bool = True,
    ) -> None:
        super().__init__()
        if loss_type not in ("DiceLoss", "DiceCE"):
            raise ConfigError(f"loss_type: expected 'DiceLoss' or 'DiceCE', got {loss_type!r}")
        self.targets = validate_targets(targets)
        if len(self.targets) < 2:
            raise ConfigError(f"MultiTargetLoss needs several targets, got {list(self.targets)}")
        self.loss_type = loss_type
        self.batch = batch
        self.foreground_weights = None if foreground_weights is None else tuple(float(w) for w in foreground_weights)
        self.contour_pos_weight = None if contour_pos_weight is None else float(contour_pos_weight)

    def voxel_weights(self, name: str, target: torch.Tensor) -> torch.Tensor:
        """The cross-entropy weights of target ``name``'s channel ``(N, z, y, x)``."""
        if name == FOREGROUND:
            if self.foreground_weights is None:
                return torch.ones_like(target)
            bg, fg = self.foreground_weights
            return bg + (fg - bg) * target
        if name == CONTOUR:
            if self.contour_pos_weight is None:
                return balanced_weights(target)
            return 1.0 + (self.contour_pos_weight - 1.0) * target
        raise ConfigError(f"no loss is defined for target {name!r}")

    def terms(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each target's loss (Dice + weighted BCE for ``DiceCE``), by name."""
        if logits.shape[1] != len(self.targets) or target.shape != logits.shape:
            raise ConfigError(
                f"the loss of targets {list(self.targets)} needs logits and targets of "
                f"{len(self.targets)} channels; got {list(logits.shape)} and {list(target.shape)}"
            )
        target = target.to(logits.dtype)
        out: dict[str, torch.Tensor] = {}
        for c, name in enumerate(self.targets):
            z, y = logits[:, c], target[:, c]
            loss = soft_dice_loss(torch.sigmoid(z), y, batch=self.batch)
            if self.loss_type == "DiceCE":
                loss = loss + weighted_bce(z, y, self.voxel_weights(name, y))
            out[name] = loss
        return out

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.stack(list(self.terms(logits, target).values())).sum()
