"""What a model predicts: its targets, how logits become probabilities, where each is stored.

A model predicts one or more *targets*, one output channel each, in this order:

- ``foreground`` — the voxel belongs to a mitochondrion (always first, always present);
- ``contour`` — the voxel lies on an instance's contour: where a mitochondrion meets the
  background or another mitochondrion (pytorch_connectomics' instance-contour target, the
  second channel of its MitoEM ``bc_watershed`` recipe).

A single-target model keeps the original layout: two softmax channels (background,
foreground), as every checkpoint made before targets existed. A model with several targets
has one channel per target, each a sigmoid. The checkpoint records its targets under
``targets``; one without the key is a single-target foreground model.

This module is the one place that knows these rules: training, prediction and export call it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from catena_mito.errors import CheckpointError, ConfigError

FOREGROUND = "foreground"
CONTOUR = "contour"
#: Every target a model can learn, in channel order.
KNOWN_TARGETS: tuple[str, ...] = (FOREGROUND, CONTOUR)
DEFAULT_TARGETS: tuple[str, ...] = (FOREGROUND,)

#: The array of a non-foreground target sits beside the foreground's, with this suffix:
#: ``volumes/predictions/mito`` and ``volumes/predictions/mito_contour``.
_SUFFIX = {FOREGROUND: "", CONTOUR: "_contour"}
#: The attribute every prediction array carries: which target it holds.
TARGET_ATTR = "catena_target"


def validate_targets(targets: Sequence[str]) -> tuple[str, ...]:
    """The targets in canonical order; ``foreground`` first, no repeats, known names only.

    Raises:
        ConfigError: an unknown or repeated target, or ``foreground`` missing.
    """
    names = tuple(targets)
    unknown = [t for t in names if t not in KNOWN_TARGETS]
    if unknown:
        raise ConfigError(f"unknown target(s) {unknown}; known: {list(KNOWN_TARGETS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"targets repeat a name: {list(names)}")
    if FOREGROUND not in names:
        raise ConfigError(f"targets must include {FOREGROUND!r}: {list(names)}")
    return tuple(t for t in KNOWN_TARGETS if t in names)


def out_channels(targets: Sequence[str]) -> int:
    """Output channels of a model predicting ``targets``: 2 (softmax) for one, else one each."""
    targets = validate_targets(targets)
    return 2 if len(targets) == 1 else len(targets)


def checkpoint_targets(ckpt: Mapping[str, Any]) -> tuple[str, ...]:
    """The targets a checkpoint's model predicts (``foreground`` alone for older ones)."""
    raw = ckpt.get("targets", list(DEFAULT_TARGETS))
    if not isinstance(raw, (list, tuple)) or not all(isinstance(t, str) for t in raw):
        raise CheckpointError(f"checkpoint 'targets' must be a list of names, got {raw!r}")
    try:
        return validate_targets(raw)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint targets are invalid: {e}") from e


def probabilities(logits: Any, targets: Sequence[str]) -> Any:
    """Per-target probabilities ``(N, T, ...)`` of logits ``(N, C, ...)`` (torch tensors).

    One target: softmax over the two channels, channel 1 kept (``C == 1``: a sigmoid, for
    models with a single logit). Several targets: a sigmoid per channel.

    Raises:
        CheckpointError: the channel count does not fit the targets.
    """
    import torch

    targets = validate_targets(targets)
    channels = logits.shape[1]
    if len(targets) == 1:
        if channels == 2:
            return torch.softmax(logits, dim=1)[:, 1:2]
        if channels == 1:
            return torch.sigmoid(logits)
    elif channels == len(targets):
        return torch.sigmoid(logits)
    raise CheckpointError(
        f"the model has {channels} output channels, which does not fit targets {list(targets)} "
        f"(expected {out_channels(targets)})"
    )


def prediction_url(foreground_url: str, target: str) -> str:
    """Where ``target``'s probabilities live, given the foreground prediction's URL."""
    if target not in _SUFFIX:
        raise ConfigError(f"unknown target {target!r}; known: {list(KNOWN_TARGETS)}")
    return foreground_url.rstrip("/") + _SUFFIX[target]


def instance_contour(ids: np.ndarray, width: int = 1) -> np.ndarray:
    """The contour target of an instance volume: bool, True on each instance's rim.

    A foreground voxel is contour when a voxel within ``width`` (chessboard distance, so a
    ``(2 width + 1)^3`` box) has another id — background or another instance. Voxels outside
    the volume count as copies of the nearest inside voxel: a volume's edge is no contour,
    since the object may go on beyond it. Background voxels are never contour.
    """
    from scipy import ndimage

    if width < 1:
        raise ConfigError(f"contour width must be >= 1, got {width}")
    ids = np.asarray(ids)
    size = 2 * int(width) + 1
    high = ndimage.maximum_filter(ids, size=size, mode="nearest")
    low = ndimage.minimum_filter(ids, size=size, mode="nearest")
    return (ids != 0) & ((high != ids) | (low != ids))
