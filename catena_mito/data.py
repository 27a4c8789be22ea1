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

5. **Select** (:func:`plan_patches`): with ``balance_patches`` a patch with fewer than
   ``min_positive_pixels`` foreground voxels is *negative*, the others *positive*;
   negatives are kept with the sampling weight ``negative_patch_weight`` (relative to 1 for
   a positive patch; weight 0 drops them, Catena's old behaviour here). Mitochondria-free
   regions are what teaches a model not to fire on vesicles, membranes and dark
   cytoplasm, so dropping them costs false positives on real data. Then
   ``subsample_frac`` keeps that fraction and ``subsample_number`` at most that many,
   drawn with ``subsample_seed`` (the selection does not depend on ``seed``, so one patch
   set can be trained with several seeds).
6. **Sample** (:class:`EpochSampler`). An *epoch* is one pass over the selected patch list
   in a fresh random order (from ``seed`` and the epoch number); under DDP the order is
   split between ranks (every rank gets the same number of draws, the list is padded by
   wrapping around, as ``DistributedSampler`` does). With ``steps_per_epoch`` an epoch is
   that many optimisation steps instead, cycling through fresh permutations. When the
   patches have unequal weights (balancing), an epoch draws as many patches *with
   replacement*, each with probability proportional to its weight (so with weight 0.25
   and as many negative as positive patches, one draw in five is negative).
7. **Targets** (``targets``). ``foreground`` is the binary label of step 3. ``contour``
   (:func:`catena_mito.targets.instance_contour`) is derived once per dataset from the
   whole instance-id volume at the training resolution, never per patch: a patch cut
   from the volume has no neighbours beyond its edge, so a per-patch derivation would
   miss the rim of an object that continues outside the patch or invent one where the
   patch cuts through it. The patch's targets travel through the augmentation as one
   label array (foreground in bit 0, contour in bit 1), so every geometric change made to
   the label (rotation, flips, elastic warp, misalignment) is made to the contour
   identically, with the same random numbers; for the exact permutations (rotations and
   flips) this equals deriving the contour from the transformed labels.
8. **Augment** (:class:`Augmenter`), per draw, from a random generator seeded by
   ``(seed, epoch, draw)``, so a run is reproducible whatever ``num_workers`` is and a
   resumed run draws what the uninterrupted run would have drawn. Besides rotations,
   flips and intensity changes, EM-specific defects can be simulated, each with its own
   probability per patch (all off by default): missing sections, misaligned sections,
   blurred sections and a smooth elastic deformation (see :class:`Augmenter`).
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
from catena_mito.blockwise.geometry import Coord, as_coord
from catena_mito.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = [
    "EM_AUGMENTATION",
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
    #: Instance ids (z, y, x) for the instance F1 of validation, when kept and meaningful
    #: (``label_type: mito`` with instance labels, not a binary mask).
    ids: np.ndarray | None = None
    #: The contour target (bool, z, y, x) of the whole volume, when asked for
    #: (:func:`catena_mito.targets.instance_contour` of the ids at this resolution).
    contour: np.ndarray | None = None

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
    keep_ids: bool = False,
    contour_width: int | None = None,
) -> TrainingVolume:
    """Read ``volumes/raw`` and the ``label_type`` labels of the dataset at ``url`` once.

    ``keep_ids``: also keep the instance ids (``label_type: mito`` and labels with more
    than one id value only; a binary mask holds no instances) for instance metrics.
    ``contour_width``: also derive the contour target of the whole volume (voxels at the
    training resolution; ``label_type: mito`` only).

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
    keep = keep_ids and label_type == "mito" and ids.size and int(ids.max()) > 1
    contour = None
    if contour_width is not None:
        from catena_mito.targets import instance_contour

        if label_type != "mito":
            raise ConfigError(f"the contour target needs mitochondria instance ids (label_type 'mito'), not {label_type!r}")
        contour = instance_contour(ids, contour_width)
    return TrainingVolume(url=shown, raw=raw, label=label, resolution=resolution,  # type: ignore[arg-type]
                          ids=ids if keep else None, contour=contour)


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
        keep_ids_for: Sequence[str] = (),
        contour_width: int | None = None,
    ) -> None:
        self.label_type = label_type
        #: Derive the contour target of every volume read (None: no contour target).
        self.contour_width = contour_width
        #: Datasets (validation) whose instance ids are kept (see read_training_volume).
        self.keep_ids_for = {u.rstrip("/") for u in keep_ids_for}
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
                storage_options=self.storage_options, keep_ids=key in self.keep_ids_for,
                contour_width=self.contour_width,
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
    """A patch: the index of its volume, its start corner (z, y, x voxels) and its
    sampling weight (1.0; ``negative_patch_weight`` for a negative patch when balancing)."""

    volume: int
    start: Coord
    weight: float = 1.0


def plan_patches(
    volumes: Sequence[TrainingVolume],
    patch_size: Sequence[int],
    stride: Sequence[int],
    *,
    balance_patches: bool = False,
    min_positive_pixels: int = 1,
    negative_patch_weight: float = 0.0,
    subsample_frac: float = 1.0,
    subsample_number: int | None = None,
    subsample_seed: int = 0,
) -> list[PatchRef]:
    """The patch list of a run: the grid of every volume, balanced and subsampled.

    The result is sorted (volume, then C order), so it does not depend on the order in
    which the subsampling drew it. With ``balance_patches`` a patch with fewer than
    ``min_positive_pixels`` foreground voxels is negative: it gets the weight
    ``negative_patch_weight`` (0 drops it).

    Raises:
        DataError: no patch is left (the message says which step removed them).
    """
    patch = as_coord(patch_size, "patch_size")
    refs = [PatchRef(v, s) for v, vol in enumerate(volumes) for s in patch_starts(vol.shape, patch, stride)]
    total = len(refs)
    if balance_patches:
        positive = [_positives(volumes[r.volume], r.start, patch) >= min_positive_pixels for r in refs]
        if not any(positive):
            raise DataError(
                f"balance_patches: none of the {total} patches has at least "
                f"min_positive_pixels={min_positive_pixels} foreground voxels; lower "
                "min_positive_pixels or check the labels"
            )
        if negative_patch_weight > 0:
            refs = [r if pos else PatchRef(r.volume, r.start, float(negative_patch_weight))
                    for r, pos in zip(refs, positive)]
        else:
            refs = [r for r, pos in zip(refs, positive) if pos]
        n_neg = sum(1 for p in positive if not p)
        log.info("balance_patches: %d positive, %d negative patches (negative weight %g)",
                 total - n_neg, n_neg, negative_patch_weight)
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
        weights: Sequence[float] | None = None,
    ) -> None:
        if num_patches < 1:
            raise DataError("no training patches")
        self.num_patches = num_patches
        self.probabilities: np.ndarray | None = None
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (num_patches,) or np.any(w < 0) or w.sum() <= 0:
                raise DataError(f"patch weights: expected {num_patches} non-negative weights, not all 0")
            if np.any(w != w[0]):  # equal weights: the exact permutation pass below
                self.probabilities = w / w.sum()
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        # One pass over the list, padded so every rank gets the same number of draws.
        self.draws_per_rank = draws_per_rank or math.ceil(num_patches / world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> np.ndarray:
        """The epoch's patch order for all ranks (permutations appended until long enough;
        weighted draws with replacement when the weights differ)."""
        needed = self.draws_per_rank * self.world_size
        if self.probabilities is not None:
            rng = np.random.default_rng([self.seed, self.epoch, 2**31 - 1])
            return rng.choice(self.num_patches, size=needed, replace=True, p=self.probabilities)
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


#: Amounts of the EM augmentations (voxels unless said otherwise).
EM_AUGMENTATION = {
    "missing_sections": (1, 2),  # sections replaced per affected patch
    "misalignment_max_frac": 0.08,  # max in-plane shift, fraction of the patch's y/x size
    "blur_sigma": (0.5, 1.5),  # in-plane Gaussian sigma
    "blur_sections": (1, 3),  # sections blurred (or the whole patch, half of the time)
    "elastic_max_displacement": 3.0,  # voxels, in-plane
    "elastic_grid": 4,  # control points per y/x axis of the smooth displacement field
}


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

    EM defects, each applied to a patch with its own probability (amounts in
    :data:`EM_AUGMENTATION`), in this order:

    * ``elastic``: a smooth in-plane displacement field (cubic interpolation of random
      displacements on a coarse grid, up to 3 voxels), image linear, label nearest;
    * ``misalignment``: from a random section on, the sections are shifted in-plane by up
      to 8 % of the patch (half of the time only that one section: a "slip"), image and
      label alike, the border repeated;
    * ``blur``: an in-plane Gaussian blur of 1-3 sections (half of the time the whole
      patch), image only;
    * ``missing_section``: 1-2 sections replaced by the patch's mean grey value, image
      only (the label keeps what is there: the model learns to bridge a lost section).

    A probability of 0 draws no random number, so enabling nothing keeps the random
    stream of older versions.
    """

    def __init__(
        self,
        rotation: bool,
        contrast: bool,
        *,
        missing_section: float = 0.0,
        misalignment: float = 0.0,
        blur: float = 0.0,
        elastic: float = 0.0,
    ) -> None:
        self.rotation = rotation
        self.contrast = contrast
        self.missing_section = float(missing_section)
        self.misalignment = float(misalignment)
        self.blur = float(blur)
        self.elastic = float(elastic)
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
        if self.elastic and rng.random() < self.elastic:
            image, label = elastic_deform(image, label, rng)
        if self.misalignment and rng.random() < self.misalignment:
            image, label = misalign_sections(image, label, rng)
        if self._intensity:
            from monai.utils import convert_to_numpy

            x = image[None]  # MONAI wants a channel axis
            for t in self._intensity:
                # Each transform draws from its own RandomState seeded from this draw's
                # generator: the result depends on (seed, epoch, draw) only.
                t.set_random_state(seed=int(rng.integers(2**31)))
                x = t(x)
            image = np.ascontiguousarray(convert_to_numpy(x)[0], dtype=np.float32)
        if self.blur and rng.random() < self.blur:
            image = blur_sections(image, rng)
        if self.missing_section and rng.random() < self.missing_section:
            image = drop_sections(image, rng)
        return image, label


def _pick_sections(depth: int, count: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    k = min(depth, int(rng.integers(count[0], count[1] + 1)))
    return np.sort(rng.choice(depth, size=k, replace=False))


def drop_sections(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """1-2 z sections of ``image`` (z, y, x) replaced by its mean value (a copy)."""
    out = np.array(image, dtype=np.float32, copy=True)
    out[_pick_sections(out.shape[0], EM_AUGMENTATION["missing_sections"], rng)] = float(out.mean())
    return out


def blur_sections(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """In-plane Gaussian blur of a few z sections, or of all of them (a copy)."""
    from scipy.ndimage import gaussian_filter

    out = np.array(image, dtype=np.float32, copy=True)
    lo, hi = EM_AUGMENTATION["blur_sigma"]
    sigma = float(rng.uniform(lo, hi))
    if rng.random() < 0.5:
        return gaussian_filter(out, sigma=(0.0, sigma, sigma), mode="reflect").astype(np.float32)
    for z in _pick_sections(out.shape[0], EM_AUGMENTATION["blur_sections"], rng):
        out[z] = gaussian_filter(out[z], sigma=sigma, mode="reflect")
    return out


def _shift2d(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Shift the last two axes by (dy, dx) voxels, repeating the border (same shape)."""
    py, px = abs(dy), abs(dx)
    pad = [(0, 0)] * (a.ndim - 2) + [(py, py), (px, px)]
    padded = np.pad(a, pad, mode="edge")
    y0, x0 = py - dy, px - dx
    return padded[..., y0 : y0 + a.shape[-2], x0 : x0 + a.shape[-1]]


def misalign_sections(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Shift the sections from a random z on (or that one section) in-plane; image and label alike."""
    depth, height, width = image.shape
    if depth < 2:
        return image, label
    limit = max(1, round(EM_AUGMENTATION["misalignment_max_frac"] * min(height, width)))
    z0 = int(rng.integers(1, depth))
    dy, dx = (int(v) for v in rng.integers(-limit, limit + 1, size=2))
    stop = z0 + 1 if rng.random() < 0.5 else depth
    image, label = image.copy(), label.copy()
    image[z0:stop] = _shift2d(image[z0:stop], dy, dx)
    label[z0:stop] = _shift2d(label[z0:stop], dy, dx)
    return image, label


def elastic_deform(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random in-plane displacement (the same for image and label)."""
    from scipy.ndimage import map_coordinates, zoom

    shape = image.shape
    grid = EM_AUGMENTATION["elastic_grid"]
    amount = EM_AUGMENTATION["elastic_max_displacement"]
    coarse_z = max(2, shape[0] // 8)
    fields = []
    for _ in range(2):  # dy, dx
        coarse = rng.uniform(-amount, amount, size=(coarse_z, grid, grid))
        fine = zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=3, mode="nearest", grid_mode=True)
        fields.append(fine[: shape[0], : shape[1], : shape[2]])
    zz, yy, xx = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    coords = np.stack([zz, yy + fields[0], xx + fields[1]])
    warped = map_coordinates(image, coords, order=1, mode="reflect").astype(np.float32)
    warped_label = map_coordinates(label, coords, order=0, mode="reflect").astype(label.dtype)
    return warped, warped_label


# --- the dataset ----------------------------------------------------------------------------


#: Bit of each target in the packed label that goes through augmentation.
_TARGET_BITS = {"foreground": 0, "contour": 1}


def pack_targets(volume: TrainingVolume, sl: tuple[slice, ...], targets: Sequence[str]) -> np.ndarray:
    """The targets of one patch as one uint8 label, target ``t`` in bit ``_TARGET_BITS[t]``.

    One array, so the augmentation moves every target with the same transform; with the
    foreground alone it is the plain {0, 1} label.
    """
    packed = np.array(volume.label[sl], dtype=np.uint8, copy=True)
    for target in targets:
        bit = _TARGET_BITS[target]
        if bit == 0:
            continue
        if target == "contour":
            if volume.contour is None:
                raise ConfigError(f"{volume.url}: the contour target was asked for but not derived")
            packed |= volume.contour[sl].astype(np.uint8) << bit
    return packed


def unpack_targets(packed: np.ndarray, targets: Sequence[str]) -> np.ndarray:
    """``(T, z, y, x)`` uint8 {0, 1}, one channel per target, from :func:`pack_targets`."""
    return np.stack([(packed >> _TARGET_BITS[t]) & 1 for t in targets]).astype(np.uint8)


class PatchDataset(Dataset):
    """Patches of in-memory volumes, indexed by the keys :class:`EpochSampler` yields.

    An item is ``(image, label)``: ``image`` float32 ``(1, z, y, x)``, ``label`` uint8
    ``(T, z, y, x)`` with values {0, 1}, one channel per target of ``targets`` (default
    the foreground alone, ``T = 1``).
    """

    def __init__(
        self,
        volumes: Sequence[TrainingVolume],
        patches: Sequence[PatchRef],
        patch_size: Sequence[int],
        augmenter: Augmenter | None = None,
        seed: int = 0,
        targets: Sequence[str] = ("foreground",),
    ) -> None:
        from catena_mito.targets import validate_targets

        self.targets = validate_targets(targets)
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
        multi = len(self.targets) > 1
        image = vol.raw[sl]
        label = pack_targets(vol, sl, self.targets) if multi else vol.label[sl]
        if self.augmenter is not None:
            rng = np.random.default_rng([self.seed, epoch, draw])
            image, label = self.augmenter(image, label, rng)
        image = np.ascontiguousarray(image, dtype=np.float32)
        label = unpack_targets(label, self.targets) if multi else np.ascontiguousarray(label)[None]
        return torch.from_numpy(image)[None], torch.from_numpy(label)
