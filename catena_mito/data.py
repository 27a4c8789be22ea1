"""Training data: whole volumes read once, a patch grid over them, and augmentation.

Everything is (z, y, x); shapes and offsets are in voxels at the training resolution
(``target_res``, nm), resolutions in nm.

How a training run gets its patches
-----------------------------------

1. **Read once.** Each dataset (``train_zarr_dirs``/``test_zarr_dirs``, local or ``s3://``)
   is read whole into memory exactly once per run: ``volumes/raw`` and the label array of
   ``label_type``. Patches are cut from memory, so object storage sees one GET per chunk
   per run, never one per patch or per epoch (:class:`VolumeCache`). Training volumes must
   therefore fit in RAM (crop large ones); each DDP process holds its own copy.
2. **Preprocess like predict.** :func:`prepare_raw` is
   :func:`catena_mito.preprocess.preprocess_volume`, the function ``predict`` uses: CLAHE
   per z slice when asked (else the fixed dtype normalisation to [0, 1]), then resampling
   from ``original_res`` (default: the ``resolution`` attribute of ``volumes/raw``) to
   ``target_res``. Labels are resampled with nearest neighbour.
3. **Binarise** (:func:`binary_target`). ``mito``: foreground = ``mito_ids > 0``.
   ``neuron``: foreground = *cell boundaries*, voxels whose 6-neighbourhood holds a
   different neuron id (the membranes, 2 voxels thick). Learning membranes rather than
   neuron interiors makes the neuron → mito transfer useful: the encoder learns thin,
   dark, membrane-like structures, which is what a mitochondrion's double membrane and
   cristae look like.
4. **Patch grid** (:func:`patch_starts`). Starts every ``stride`` voxels, plus one patch
   flush with the far edge of each axis, so every voxel is in at least one patch::

       axis of 100 voxels, patch 32, stride 32:  starts 0, 32, 64, 68
                                                 (68 + 32 = 100: flush with the edge)

5. **Select** (:func:`plan_patches`): ``balance_patches`` drops patches with fewer than
   ``min_positive_pixels`` foreground voxels; then ``subsample_frac`` keeps that fraction
   and ``subsample_number`` at most that many, drawn with ``subsample_seed`` (the
   selection does not depend on ``seed``, so one patch set can be trained with several
   seeds).
6. **Sample** (:class:`EpochSampler`). An *epoch* is one pass over the selected patch list
   in a fresh random order (from ``seed`` and the epoch number); under DDP the order is
   split between ranks (every rank gets the same number of draws, the list is padded by
   wrapping around, as ``DistributedSampler`` does). With ``steps_per_epoch`` an epoch is
   that many optimisation steps instead, cycling through fresh permutations.
7. **Augment** (:class:`Augmenter`), per draw, from a random generator seeded by
   ``(seed, epoch, draw)``, so a run is reproducible whatever ``num_workers`` is and a
   resumed run draws what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from catena_mito import storage
from catena_mito.errors import ConfigError, DataError
from catena_mito.blockwise.geometry import Coord, as_coord

log = logging.getLogger(__name__)

__all__ = [
    "Augmenter",
    "EpochSampler",
    "PatchDataset",
    "PatchRef",
    "TrainingVolume",
    "VolumeCache",
    "binary_target",
    "neuron_boundaries",
    "patch_starts",
    "plan_patches",
    "prepare_raw",
    "read_training_volume",
]


# --- targets ------------------------------------------------------------------------------


def neuron_boundaries(ids: np.ndarray) -> np.ndarray:
    """Voxels (z, y, x) whose 6-neighbourhood contains a different id, as uint8 {0, 1}.

    Both sides of an interface are marked, so a membrane is 2 voxels thick. Voxels at the
    volume border only compare with neighbours inside the volume.
    """
    ids = np.asarray(ids)
    out = np.zeros(ids.shape, dtype=bool)
    for axis in range(ids.ndim):
        lo = [slice(None)] * ids.ndim
        hi = [slice(None)] * ids.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        differs = ids[tuple(lo)] != ids[tuple(hi)]
        out[tuple(lo)] |= differs
        out[tuple(hi)] |= differs
    return out.astype(np.uint8)


def binary_target(ids: np.ndarray, label_type: str) -> np.ndarray:
    """The training target of ``label_type`` as uint8 {0, 1} (see the module docstring)."""
    if label_type == "mito":
        return (np.asarray(ids) != 0).astype(np.uint8)
    if label_type == "neuron":
        return neuron_boundaries(ids)
    raise ConfigError(f"label_type: expected 'mito' or 'neuron', got {label_type!r}")


# --- volumes --------------------------------------------------------------------------------


@dataclass
class TrainingVolume:
    """One dataset in memory, preprocessed, at the training resolution.

    ``raw`` is float32 (normalised), ``label`` uint8 {0, 1}, both (z, y, x) of the same
    shape; ``resolution`` in nm (None when unknown and no resampling was asked for).
    """

    url: str
    raw: np.ndarray
    label: np.ndarray
    resolution: tuple[float, float, float] | None

    @property
    def shape(self) -> Coord:
        return tuple(int(s) for s in self.raw.shape)  # type: ignore[return-value]


def prepare_raw(
    raw: np.ndarray,
    original_res: Sequence[float] | None,
    target_res: Sequence[float] | None,
    clahe: bool,
) -> np.ndarray:
    """Raw (z, y, x) → float32 model input, exactly as ``predict`` prepares it.

    :func:`catena_mito.preprocess.preprocess_volume`: CLAHE per z slice (``clahe``) or
    the fixed dtype normalisation, then resampling from ``original_res`` to
    ``target_res`` (nm; skipped when ``target_res`` is None).
    """
    from catena_mito import preprocess

    out = preprocess.preprocess_volume(raw, original_res if target_res is not None else None, target_res, clahe)
    return np.ascontiguousarray(out, dtype=np.float32)


def _read_whole(array: Any) -> np.ndarray:
    """Read a whole array into memory: the only place training reads volume data."""
    return np.asarray(array[...])


def read_training_volume(
    url: str,
    label_type: str,
    *,
    original_res: Sequence[float] | None = None,
    target_res: Sequence[float] | None = None,
    clahe: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> TrainingVolume:
    """Read ``volumes/raw`` and the ``label_type`` labels of the dataset at ``url`` once.

    Raises:
        StorageError: an array is missing or unreadable (the message names its URL).
        DataError: the arrays differ in shape, or resampling is asked for but the
        resolution is unknown.
    """
    shown = storage.redact_url(url)
    raw_arr = storage.open_volume(storage.join_url(url, storage.RAW_PATH), storage_options)
    label_url = storage.join_url(url, storage.LABEL_PATHS[label_type])
    label_arr = storage.open_volume(label_url, storage_options)
    if tuple(raw_arr.shape) != tuple(label_arr.shape):
        raise DataError(
            f"{shown}: volumes/raw has shape {list(raw_arr.shape)} but "
            f"{storage.LABEL_PATHS[label_type]} has {list(label_arr.shape)} (z, y, x); "
            "they must match voxel for voxel"
        )
    if original_res is None:
        original_res = storage.read_spatial(raw_arr)[0]
    if target_res is not None and original_res is None:
        raise DataError(
            f"{shown}: target_res {list(target_res)} is set but the resolution of "
            "volumes/raw is unknown (no `resolution` attribute); set original_res (nm, z y x)"
        )
    resolution = tuple(float(r) for r in (target_res or original_res)) if (target_res or original_res) else None

    raw = prepare_raw(_read_whole(raw_arr), original_res, target_res, clahe)
    ids = _read_whole(label_arr)
    if target_res is not None:
        from catena_mito import preprocess

        # Nearest neighbour keeps ids ids; boundaries are then found at the training
        # resolution, so membranes are 2 voxels thick whatever the input resolution.
        ids = preprocess.resample_labels(ids, original_res, target_res)
    label = binary_target(ids, label_type)
    if label.shape != raw.shape:  # resampling both the same way should make this impossible
        raise DataError(f"{shown}: resampled raw {raw.shape} and labels {label.shape} differ")
    return TrainingVolume(url=shown, raw=raw, label=label, resolution=resolution)  # type: ignore[arg-type]


class VolumeCache:
    """Reads each dataset once per run and hands out the same in-memory volume after.

    Training and validation lists may name the same dataset; it is still read once.
    ``reads`` counts the datasets actually read (for tests and logs).
    """

    def __init__(
        self,
        label_type: str,
        *,
        original_res: Sequence[float] | None = None,
        target_res: Sequence[float] | None = None,
        clahe: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.label_type = label_type
        self.original_res = original_res
        self.target_res = target_res
        self.clahe = clahe
        self.storage_options = dict(storage_options or {})
        self.reads = 0
        self._volumes: dict[str, TrainingVolume] = {}

    def get(self, url: str) -> TrainingVolume:
        key = url.rstrip("/")
        if key not in self._volumes:
            log.info("reading %s into memory", storage.redact_url(url))
            self._volumes[key] = read_training_volume(
                url, self.label_type, original_res=self.original_res,
                target_res=self.target_res, clahe=self.clahe,
                storage_options=self.storage_options,
            )
            self.reads += 1
        return self._volumes[key]


# --- the patch grid -------------------------------------------------------------------------


def patch_starts(volume_shape: Sequence[int], patch_size: Sequence[int], stride: Sequence[int]) -> list[Coord]:
    """Start corners (z, y, x) of the patch grid, in C order.

    Per axis: ``0, stride, 2·stride, …`` while the patch fits, plus ``size - patch`` when
    the last regular patch does not reach the far edge (see the module docstring).

    Raises:
        DataError: the volume is smaller than the patch in some axis.
    """
    shape, patch, step = as_coord(volume_shape), as_coord(patch_size, "patch_size"), as_coord(stride, "stride")
    if any(s <= 0 for s in step):
        raise ConfigError(f"stride must be positive, got {list(step)}")
    small = [a for a, s, p in zip("zyx", shape, patch) if s < p]
    if small:
        raise DataError(
            f"volume of shape {list(shape)} (z, y, x voxels at the training resolution) is "
            f"smaller than patch_size {list(patch)} in axis {', '.join(small)}; use a smaller "
            "patch_size or a larger volume"
        )
    per_axis = []
    for size, p, s in zip(shape, patch, step):
        starts = list(range(0, size - p + 1, s))
        if starts[-1] != size - p:
            starts.append(size - p)
        per_axis.append(starts)
    return [(z, y, x) for z in per_axis[0] for y in per_axis[1] for x in per_axis[2]]


@dataclass(frozen=True)
class PatchRef:
    """A patch: the index of its volume and its start corner (z, y, x voxels)."""

    volume: int
    start: Coord


def plan_patches(
    volumes: Sequence[TrainingVolume],
    patch_size: Sequence[int],
    stride: Sequence[int],
    *,
    balance_patches: bool = False,
    min_positive_pixels: int = 1,
    subsample_frac: float = 1.0,
    subsample_number: int | None = None,
    subsample_seed: int = 0,
) -> list[PatchRef]:
    """The patch list of a run: the grid of every volume, balanced and subsampled.

    The result is sorted (volume, then C order), so it does not depend on the order in
    which the subsampling drew it.

    Raises:
        DataError: no patch is left (the message says which step removed them).
    """
    patch = as_coord(patch_size, "patch_size")
    refs = [PatchRef(v, s) for v, vol in enumerate(volumes) for s in patch_starts(vol.shape, patch, stride)]
    total = len(refs)
    if balance_patches:
        refs = [r for r in refs if _positives(volumes[r.volume], r.start, patch) >= min_positive_pixels]
        if not refs:
            raise DataError(
                f"balance_patches: none of the {total} patches has at least "
                f"min_positive_pixels={min_positive_pixels} foreground voxels; lower "
                "min_positive_pixels or check the labels"
            )
    rng = np.random.default_rng(subsample_seed)
    keep = len(refs)
    if subsample_frac < 1.0:
        keep = max(1, round(keep * subsample_frac))
    if subsample_number is not None:
        keep = min(keep, subsample_number)
    if keep < len(refs):
        chosen = np.sort(rng.choice(len(refs), size=keep, replace=False))
        refs = [refs[i] for i in chosen]
    log.info("%d training patches (of %d on the grid)", len(refs), total)
    return refs


def _positives(volume: TrainingVolume, start: Coord, patch: Coord) -> int:
    sl = tuple(slice(s, s + p) for s, p in zip(start, patch))
    return int(np.count_nonzero(volume.label[sl]))


# --- sampling -------------------------------------------------------------------------------


class EpochSampler(Sampler):
    """Yields ``(epoch, draw, patch_index)`` keys for one epoch of one rank.

    ``draw`` numbers the draws of the whole epoch (all ranks), so the augmentation of a draw
    depends on ``(seed, epoch, draw)`` only. Call :meth:`set_epoch` before iterating.
    """

    def __init__(
        self,
        num_patches: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        draws_per_rank: int | None = None,
    ) -> None:
        if num_patches < 1:
            raise DataError("no training patches")
        self.num_patches = num_patches
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        # One pass over the list, padded so every rank gets the same number of draws.
        self.draws_per_rank = draws_per_rank or math.ceil(num_patches / world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> np.ndarray:
        """The epoch's patch order for all ranks (permutations appended until long enough)."""
        needed = self.draws_per_rank * self.world_size
        parts, cycle = [], 0
        while sum(len(p) for p in parts) < needed:
            rng = np.random.default_rng([self.seed, self.epoch, cycle])
            parts.append(rng.permutation(self.num_patches))
            cycle += 1
        return np.concatenate(parts)[:needed]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        order = self.order()
        for draw in range(self.rank, len(order), self.world_size):
            yield (self.epoch, draw, int(order[draw]))

    def __len__(self) -> int:
        return self.draws_per_rank


# --- augmentation ---------------------------------------------------------------------------


class Augmenter:
    """Random augmentation of one (image, label) patch, (z, y, x).

    ``rotation``: a random in-plane (y, x) rotation by a multiple of 90° (multiples of 180°
    only when the patch is not square in y, x) and random flips of the z, y and x axes,
    applied identically to image and label (exact index permutations, no interpolation).
    ``contrast``: MONAI intensity transforms on the image only, each with probability 0.5:
    gamma contrast (``RandAdjustContrast``, gamma 0.7-1.5), intensity scale
    (``RandScaleIntensity``, ±10 %), intensity shift (``RandShiftIntensity``, ±0.1) and
    Gaussian noise (``RandGaussianNoise``, std 0.05) - amounts relative to the normalised
    intensity range.
    """

    def __init__(self, rotation: bool, contrast: bool) -> None:
        self.rotation = rotation
        self.contrast = contrast
        self._intensity: list[Any] = []
        if contrast:
            from monai.transforms import (
                RandAdjustContrast,
                RandGaussianNoise,
                RandScaleIntensity,
                RandShiftIntensity,
            )

            self._intensity = [
                RandAdjustContrast(prob=0.5, gamma=(0.7, 1.5)),
                RandScaleIntensity(factors=0.1, prob=0.5),
                RandShiftIntensity(offsets=0.1, prob=0.5),
                RandGaussianNoise(prob=0.5, mean=0.0, std=0.05),
            ]

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Augment (z, y, x) arrays; returns contiguous arrays (image float32, label as given)."""
        if self.rotation:
            square = image.shape[1] == image.shape[2]
            k = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
            flips = tuple(a for a in range(3) if rng.random() < 0.5)
            image = np.rot90(image, k, axes=(1, 2))
            label = np.rot90(label, k, axes=(1, 2))
            if flips:
                image = np.flip(image, flips)
                label = np.flip(label, flips)
        image = np.ascontiguousarray(image, dtype=np.float32)
        label = np.ascontiguousarray(label)
        if self._intensity:
            from monai.utils import convert_to_numpy

            x = image[None]  # MONAI wants a channel axis
            for t in self._intensity:
                # Each transform draws from its own RandomState seeded from this draw's
                # generator: the result depends on (seed, epoch, draw) only.
                t.set_random_state(seed=int(rng.integers(2**31)))
                x = t(x)
            image = np.ascontiguousarray(convert_to_numpy(x)[0], dtype=np.float32)
        return image, label


# --- the dataset ----------------------------------------------------------------------------


class PatchDataset(Dataset):
    """Patches of in-memory volumes, indexed by the keys :class:`EpochSampler` yields.

    An item is ``(image, label)``: ``image`` float32 ``(1, z, y, x)``, ``label`` uint8
    ``(1, z, y, x)`` with values {0, 1}.
    """

    def __init__(
        self,
        volumes: Sequence[TrainingVolume],
        patches: Sequence[PatchRef],
        patch_size: Sequence[int],
        augmenter: Augmenter | None = None,
        seed: int = 0,
    ) -> None:
        self.volumes = list(volumes)
        self.patches = list(patches)
        self.patch_size = as_coord(patch_size, "patch_size")
        self.augmenter = augmenter
        self.seed = seed

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, key: tuple[int, int, int] | int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(key, (int, np.integer)):
            epoch, draw, index = 0, int(key), int(key)
        else:
            epoch, draw, index = key
        ref = self.patches[index]
        vol = self.volumes[ref.volume]
        sl = tuple(slice(s, s + p) for s, p in zip(ref.start, self.patch_size))
        image, label = vol.raw[sl], vol.label[sl]
        if self.augmenter is not None:
            rng = np.random.default_rng([self.seed, epoch, draw])
            image, label = self.augmenter(image, label, rng)
        image = np.ascontiguousarray(image, dtype=np.float32)
        label = np.ascontiguousarray(label)
        return torch.from_numpy(image)[None], torch.from_numpy(label)[None]
