"""One strict, typed configuration per job, loaded from YAML.

Field names follow the Catena design. Unknown keys are errors (with a "did you mean"),
values are validated, ``--set key=value`` overrides any field (values parsed as YAML,
dotted keys reach into ``model_params`` and ``storage_options``), and the resolved config
is saved beside every output with secrets redacted.

Axis order is always (z, y, x); resolutions are in nanometres; shapes are in voxels.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from catena_mito import storage
from catena_mito.errors import ConfigError, StorageError

PositiveTriple = tuple[
    Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]
]
NonNegativeTriple = tuple[
    Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]
]
ResolutionTriple = tuple[
    Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]
]

LabelType = Literal["mito", "neuron"]
OutputFormat = Literal["zarr", "tiff"]
ModelType = Literal["monai_unet", "rs_unet"]
Device = Literal["auto", "cpu", "cuda"]

REDACTED = "***REDACTED***"
_SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "auth")


def _broadcast_triple(value: Any) -> Any:
    """Let a scalar stand for the same value on all three axes (``patch_size: 64``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (value, value, value)
    return value


class JobConfig(BaseModel):
    """Fields shared by every job."""

    model_config = ConfigDict(extra="forbid", frozen=False, validate_default=True)

    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Beyond the design. fsspec options for every URL of the job (e.g. S3 "
        "`key`, `secret`, `endpoint_url`). Prefer the AWS environment variables; secrets "
        "given here are redacted from saved configs and logs.",
    )

    def redacted_dict(self) -> dict[str, Any]:
        """The config as plain data with secrets in ``storage_options`` and URLs hidden."""
        return redact(self.model_dump(mode="json"))


def _is_secret_key(key: str) -> bool:
    k = key.lower()
    return any(word in k for word in _SECRET_WORDS) and not k.endswith(("_url", "_path"))


def redact(value: Any, parent_key: str = "") -> Any:
    """Replace secret values (keys/tokens/passwords) and URL credentials, recursively."""
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if _is_secret_key(str(k)) and v not in (None, "") else redact(v, str(k)))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v, parent_key) for v in value]
    if isinstance(value, str):
        return storage.redact_url(value)
    return value


class _PatchFields(BaseModel):
    """Patch geometry and preprocessing shared by training and inference."""

    @field_validator("patch_size", "stride", "original_res", "target_res", mode="before", check_fields=False)
    @classmethod
    def _triples(cls, v: Any) -> Any:
        return _broadcast_triple(v)

    @model_validator(mode="after")
    def _stride_within_patch(self):
        patch, stride = getattr(self, "patch_size", None), getattr(self, "stride", None)
        if patch is not None and stride is not None and any(s > p for s, p in zip(stride, patch)):
            raise ValueError(
                f"stride {list(stride)} must be <= patch_size {list(patch)} in every axis "
                "(a larger stride leaves voxels no window covers)"
            )
        return self


class TrainConfig(JobConfig, _PatchFields):
    """``catena-mito train``: patch-wise training of a semantic model."""

    exp_name: str = Field("catena_mito", min_length=1, description="Run name: checkpoints and metrics go to `<runs_dir>/<exp_name>/`.")
    train_zarr_dirs: list[str] = Field(..., min_length=1, description="Training datasets (Zarr group URLs in the dataset layout).")
    test_zarr_dirs: list[str] = Field(default_factory=list, description="Validation datasets, evaluated by full-volume sliding window every `eval_interval` epochs.")
    label_type: LabelType = Field("mito", description="Which labels to learn: `mito` (foreground = volumes/labels/mito_ids > 0) or `neuron`: the *boundaries* between neurons of volumes/labels/neuron_ids (voxels whose 6-neighbourhood holds another id, 2 voxels thick), a membrane target for pre-training an encoder that is then fine-tuned on mitochondria.")
    epochs: int = Field(100, gt=0, description="Number of training epochs.")
    batch_size: int = Field(2, gt=0, description="Patches per optimisation step (per process under DDP).")
    steps_per_epoch: int | None = Field(None, gt=0, description="Beyond the design. Optimisation steps per epoch (per process); default: one pass over the (subsampled) patch list. When set, the shuffled patch list is cycled or cut to this many steps (for tiny tests, or huge patch lists).")
    eval_interval: int = Field(10, gt=0, description="Evaluate on `test_zarr_dirs` every this many epochs (and after the last).")
    val_min_instance_size: int = Field(100, ge=0, description="Beyond the design. Validation instance F1 (reported when the validation labels are instance ids): predicted connected components smaller than this many voxels are removed first, like `label`'s `thres_small_instances`.")
    ckpt_interval: int = Field(10, gt=0, description="Keep an extra checkpoint every this many epochs (`last.pth`/`best.pth` are always kept).")
    patch_size: PositiveTriple = Field((64, 64, 64), description="Training patch shape (z, y, x), voxels at `target_res`.")
    stride: PositiveTriple = Field((32, 32, 32), description="Step of the patch grid (z, y, x), voxels; <= patch_size. The grid also covers the far edges.")
    original_res: ResolutionTriple | None = Field(None, description="Resolution of the data (nm, z, y, x); default: the `resolution` attribute of `volumes/raw`.")
    target_res: ResolutionTriple | None = Field(None, description="Resolution to train at (nm); data is resampled from `original_res`. Default: no resampling.")
    clahe: bool = Field(False, description="Contrast-limited adaptive histogram equalisation per z slice before normalisation (the same function predict uses).")
    subsample_frac: float = Field(1.0, gt=0, le=1, description="Fraction of the patch grid to keep (random, by `subsample_seed`).")
    subsample_number: int | None = Field(None, gt=0, description="Keep at most this many patches (after `subsample_frac`).")
    subsample_seed: int = Field(0, description="Seed of the patch subsampling.")
    balance_patches: bool = Field(False, description="Balance positive and negative patches: a patch with fewer than `min_positive_pixels` foreground voxels is *negative* and is drawn with `negative_patch_weight` times the probability of a positive one (negatives are kept, not dropped; weight 0 drops them).")
    min_positive_pixels: int = Field(1, ge=0, description="With `balance_patches`: a patch needs at least this many foreground voxels to count as positive.")
    negative_patch_weight: float = Field(0.25, ge=0, le=1, description="Beyond the design. With `balance_patches`: sampling weight of a negative patch relative to a positive one (1 = no balancing, 0 = negatives dropped). Negatives teach the model what is *not* a mitochondrion; without them real data gets false positives.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW, or Adam without `weight_decay`); for the first 50 epochs when `hotstart` is on.")
    learning_rate_after_hotstart_50: float = Field(1e-4, gt=0, description="With `hotstart`: the learning rate from epoch 50 on.")
    hotstart: bool = Field(False, description="Use `learning_rate` for the first 50 epochs, then `learning_rate_after_hotstart_50` (with `lr_schedule: step` only).")
    lr_schedule: Literal["step", "poly", "cosine"] = Field("step", description="Beyond the design. `step`: constant `learning_rate` (with `hotstart`: one step down after epoch 50), per epoch. `poly` (nnU-Net: (1 - t/T)^0.9) and `cosine` decay per optimisation step from `learning_rate` to 0 at the last step, after `warmup_steps` of linear warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Beyond the design. With `lr_schedule: poly/cosine`: optimisation steps of linear warm-up from 0 to `learning_rate`.")
    weight_decay: float = Field(0.0, ge=0, description="Beyond the design. Decoupled weight decay (AdamW); 0 = plain Adam.")
    loss_type: Literal["DiceLoss", "DiceCE"] = Field("DiceCE", description="`DiceCE`: foreground Dice (pooled over the batch) + class-weighted cross-entropy, summed; `DiceLoss`: the Dice term alone. The Dice term is over the foreground classes only unless `dice_include_background`.")
    loss_weights: Annotated[float, Field(gt=0)] | list[Annotated[float, Field(ge=0)]] | None = Field(None, description="Class imbalance: one number is the foreground factor (5.0 = a foreground voxel counts 5 times a background one, as in Catena), a list gives one weight per class `[background, foreground]`. Weights the cross-entropy, and the per-class Dice terms when `dice_include_background`.")
    dice_include_background: bool = Field(False, description="Beyond the design. Also average the background class into the Dice term (MONAI's default; an all-background patch then scores Dice loss 0.5 even when predicted perfectly).")
    targets: list[Literal["foreground", "contour"]] = Field(["foreground"], min_length=1, description="Beyond the design. What the model learns, one output channel each: `foreground` (always) and optionally `contour`, the rim of each instance where it meets background or another instance (`contour_width` voxels wide), derived from the instance ids of `volumes/labels/mito_ids`, which `label`'s contour mode uses to split touching mitochondria. One target keeps the 2-channel softmax model; several targets have one sigmoid channel each, each trained with binary cross-entropy (`DiceCE`) plus its own batch Dice. The checkpoint records its targets; predict writes one probability array per target.")
    contour_width: int = Field(1, ge=1, description="Beyond the design. With the `contour` target: a foreground voxel is contour when another id (background or another instance) lies within this many voxels (chessboard distance, at the training resolution). Derived once from the whole label volume, so patch edges get no false contour; a volume edge is no contour.")
    contour_pos_weight: Annotated[float, Field(gt=0)] | None = Field(None, description="Beyond the design. With the `contour` target and `DiceCE`: weight of a contour voxel in the contour channel's cross-entropy (background voxels weigh 1). Default: balanced per batch as pytorch_connectomics' `weight_binary_ratio` does, (1 - r) / r for a contour fraction r clipped to [0.05, 0.95] (so at most 19), because the thin contour is a few per cent of the voxels.")
    dice_batch: bool = Field(True, description="Beyond the design. Pool the Dice counts over the whole batch (nnU-Net's batch Dice) instead of averaging per-patch Dice: a patch without foreground then adds its false positives instead of an undefined per-patch Dice.")
    rotation_augs: bool = Field(True, description="Random in-plane 90-degree rotations and flips.")
    contrast_augs: bool = Field(True, description="Random contrast/intensity augmentations (MONAI).")
    missing_section_prob: float = Field(0.0, ge=0, le=1, description="Beyond the design. EM augmentation: probability that a patch gets 1-2 z sections replaced by their mean grey value (lost or blank sections). Image only.")
    misalignment_prob: float = Field(0.0, ge=0, le=1, description="Beyond the design. EM augmentation: probability that the sections from a random z on are shifted in-plane by up to 8 % of the patch (serial-section misalignment); image and label together.")
    blur_prob: float = Field(0.0, ge=0, le=1, description="Beyond the design. EM augmentation: probability of an in-plane Gaussian blur (sigma 0.5-1.5 voxels) of one or a few z sections (out-of-focus sections). Image only.")
    elastic_prob: float = Field(0.0, ge=0, le=1, description="Beyond the design. EM augmentation: probability of a smooth in-plane elastic deformation (displacement up to 3 voxels); image linear, label nearest.")
    model_loc: str | None = Field(None, description="Fine-tune from these weights: a catena-mito checkpoint, a bare state dict, or another tool's checkpoint (the state dict under `state_dict`, `model_state_dict`, `model`, `net`, `network`, `network_weights` or `module`; `module.`/`model.`/`_orig_mod.` name prefixes removed). Read with `weights_only=True`; the log names the tensors loaded, missing and unexpected.")
    model_loc_strict: bool = Field(True, description="Beyond the design. With `model_loc`: every tensor of the model must be in the file and every tensor of the file in the model (names and shapes). `false` allows a partial load (e.g. a new output layer): missing tensors keep their initial values, unexpected ones are ignored, both are listed in the log; shapes must still match and at least one tensor must load. Only with `model_loc`.")
    resume_checkpoint: str | None = Field(None, description="Continue a run exactly where it stopped (epoch, optimiser, RNG). `auto`: from `<runs_dir>/<exp_name>/last.pth` if it exists, else start a new run (for retried pods and requeued jobs).")
    freeze_encoder: bool = Field(False, description="Freeze the encoder parameters (for transfer learning with `model_loc`; without `model_loc` a random encoder is frozen, which is logged as a warning).")
    model_type: ModelType = Field("monai_unet", description="Backbone: `monai_unet` (MONAI UNet) or `rs_unet` (residual symmetric U-Net).")
    model_params: dict[str, Any] = Field(default_factory=dict, description="Beyond the design. Backbone hyper-parameters overriding the defaults (e.g. `channels`; `norm_momentum` for the batch-norm momentum; `variant: xie` for rs_unet's anisotropic preset after Xie et al.). See docs/tuning.md.")
    runs_dir: str = Field("runs", description="Beyond the design. Where runs are written (any fsspec URL).")
    device: Device = Field("auto", description="Beyond the design. `auto` picks CUDA when available.")
    amp: bool = Field(True, description="Beyond the design. Mixed precision on CUDA: bf16 autocast where the GPU supports it, else fp16 autocast with gradient scaling (GradScaler). No effect on CPU (logged).")
    num_workers: int = Field(0, ge=0, description="Data-loader worker processes.")
    seed: int = Field(0, description="Beyond the design. Seed of weights, patch order and augmentations (under DDP dropout uses seed + rank; the weights start identical on every rank).")

    @field_validator("loss_weights", mode="before")
    @classmethod
    def _no_bool_weights(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("expected a number (foreground factor) or a list [background, foreground]")
        return v

    @field_validator("targets", mode="after")
    @classmethod
    def _canonical_targets(cls, v: list[str]) -> list[str]:
        from catena_mito.targets import validate_targets

        try:
            return list(validate_targets(v))
        except ConfigError as e:
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _target_fields(self):
        multi = len(self.targets) > 1
        if "contour" in self.targets and self.label_type != "mito":
            raise ValueError(f"targets: the contour target is made from mitochondria instance ids; it needs label_type 'mito', not {self.label_type!r}")
        if multi and self.dice_include_background:
            raise ValueError("dice_include_background applies to the single-target softmax model; with several targets each sigmoid channel has a Dice of its positive class only (set dice_include_background: false)")
        if multi and "out_channels" in self.model_params and self.model_params["out_channels"] != len(self.targets):
            raise ValueError(f"model_params.out_channels {self.model_params['out_channels']!r} does not fit targets {self.targets} (one channel per target: {len(self.targets)}); leave it out, the targets set it")
        # a resolved config (model_dump) names every field: refuse only a width that would be ignored
        if "contour" not in self.targets and self.contour_width != type(self).model_fields["contour_width"].default:
            raise ValueError("contour_width sets the width of the contour target: it needs 'contour' in targets")
        if self.contour_pos_weight is not None and ("contour" not in self.targets or self.loss_type != "DiceCE"):
            raise ValueError("contour_pos_weight weights the contour channel's cross-entropy: it needs targets with 'contour' and loss_type DiceCE")
        return self

    @model_validator(mode="after")
    def _strict_needs_model_loc(self):
        if not self.model_loc_strict and not self.model_loc:
            raise ValueError("model_loc_strict: false needs model_loc (it says how model_loc loads)")
        return self

    @model_validator(mode="after")
    def _schedule_fields(self):
        if self.lr_schedule != "step" and self.hotstart:
            raise ValueError(f"hotstart is the `step` schedule's drop after epoch 50; it cannot be combined with lr_schedule {self.lr_schedule!r} (set hotstart: false)")
        if self.lr_schedule == "step" and self.warmup_steps:
            raise ValueError("warmup_steps needs lr_schedule poly or cosine (the step schedule has no warm-up)")
        return self


class PredictConfig(JobConfig, _PatchFields):
    """``catena-mito predict``: block-wise sliding-window inference."""

    model_path: str = Field(..., description="Checkpoint URL; the architecture is read from it.")
    test_zarr_dirs: list[str] = Field(..., min_length=1, description="Datasets to predict (Zarr group URLs with `volumes/raw`).")
    label_type: LabelType = Field("mito", description="Names the default output `volumes/predictions/<label_type>`.")
    patch_size: PositiveTriple | None = Field(None, description="Window shape (z, y, x), voxels; default: the training patch size.")
    stride: PositiveTriple | None = Field(None, description="Window step (z, y, x); default: half the window.")
    original_res: ResolutionTriple | None = Field(None, description="Input resolution (nm); default: the `resolution` attribute of `volumes/raw`.")
    target_res: ResolutionTriple | None = Field(None, description="Resolution the model runs at (nm); default: the training `target_res`.")
    clahe: bool | None = Field(None, description="CLAHE as in training; default: the training setting.")
    batch_size: int = Field(2, gt=0, description="Windows per forward pass (on CPU >= 2 is much faster than 1).")
    num_workers: int = Field(0, ge=0, description="Threads reading blocks ahead of the model.")
    output_format: OutputFormat = Field("zarr", description="`zarr` (block-wise, shardable) or `tiff` (single-process gather).")
    output_dir: str | None = Field(None, description="Output location; default: into each input store.")
    output_filename: str | None = Field(None, description="Output name inside `output_dir`; default `volumes/predictions/<label_type>`.")
    block_shape: PositiveTriple | None = Field(None, description="Beyond the design. Unit of sharding (z, y, x voxels); a multiple of `output_chunks`. Default: per axis the smallest multiple of lcm(`output_chunks`, `stride`) that is at least max(128, 2 x `patch_size`) (an axis shorter than that is one block), so each block owns whole rows of windows and its overlap into the next block stays small.")
    output_chunks: PositiveTriple = Field((64, 64, 64), description="Beyond the design. Chunk shape of the output array.")
    output_dtype: Literal["uint8", "float16", "float32"] = Field("uint8", description="Beyond the design. `uint8` stores probability*255.")
    output_res: Literal["target", "original"] = Field("target", description="Beyond the design. `original` resamples the output back to the input grid.")
    device: Device = Field("auto", description="Beyond the design. `auto` picks CUDA when available.")
    tta: Literal["none", "flips"] = Field("none", description="Beyond the design. Test-time augmentation: average over in-plane flips.")
    amp: bool = Field(True, description="Beyond the design. With `precision: auto`: bf16 autocast on CUDA (fp16 on GPUs without bf16); no effect on CPU. Leave it unset when `precision` is given.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Beyond the design. Arithmetic of the model's forward pass: `auto` follows `amp`; `bf16`/`fp16` autocast on any device, CPU included (`bf16` falls back to `fp16` on a GPU without bf16). Part of the run identity.")
    channels_last: bool = Field(False, description="Beyond the design. Model and input in `torch.channels_last_3d` memory format (often faster 3-D convolutions on GPUs). Part of the run identity (it may change float rounding).")
    compile: bool = Field(False, description="Beyond the design. `torch.compile` the model once per process (slow start; faster GPU forward passes). Part of the run identity (it may change float rounding).")
    window_sharing: Literal["exchange", "recompute"] = Field("exchange", description="Beyond the design. `exchange`: each window of the whole-volume grid is computed once, by the block holding its start, and its overlap into the next blocks is summed in a second phase (`blend`; exact integer sums). `recompute`: each block runs every window touching it (one phase; float blend; up to ~3x the windows). `output_res: original` with resampling always uses `recompute`.")
    model_type: ModelType | None = Field(None, description="Optional; must match the checkpoint when given.")
    pyramid_levels: int = Field(0, ge=0, le=16, description="Beyond the design. Coarser resolution levels to build after the prediction completes (each halves the finest axes; see docs/viewing.md); 0: none.")

    @model_validator(mode="after")
    def _pyramid_needs_zarr(self):
        if self.pyramid_levels and self.output_format != "zarr":
            raise ValueError(f"pyramid_levels {self.pyramid_levels} needs output_format 'zarr' (got {self.output_format!r})")
        return self

    @model_validator(mode="after")
    def _block_multiple_of_chunks(self):
        from catena_mito.blockwise.geometry import check_chunk_alignment

        if self.block_shape is not None:
            try:
                check_chunk_alignment(self.block_shape, self.output_chunks)
            except ConfigError as e:
                raise ValueError(str(e)) from None
        if self.precision != "auto" and "amp" in self.model_fields_set:
            raise ValueError(f"amp and precision {self.precision!r} are both set; amp only chooses "
                             "the precision under `precision: auto`, so remove one of them")
        return self

    @field_validator("block_shape", "output_chunks", mode="before")
    @classmethod
    def _triples_block(cls, v: Any) -> Any:
        return _broadcast_triple(v)


class LabelConfig(JobConfig):
    """``catena-mito label``: threshold, connected components, size filter, block-wise."""

    input_prediction_path: str = Field(..., description="Probability volume: a Zarr array URL or a .tif/.tiff file.")
    output_instance_dir: str = Field(..., description="Zarr group URL (or a folder, for TIFF) receiving the instances.")
    output_filename: str = Field("mito_instances", min_length=1, description="Output array name inside `output_instance_dir`.")
    output_format: OutputFormat = Field("zarr", description="`zarr` (block-wise, shardable) or `tiff` (single-process gather).")
    chunk_size: PositiveTriple = Field((128, 128, 128), description="Block shape and output chunk shape (z, y, x voxels).")
    overlap: NonNegativeTriple = Field((0, 0, 0), description="Accepted for compatibility; exact stitching needs no overlap, so it has no effect.")
    thres_foreground: float = Field(0.5, ge=0, le=1, description="Foreground where probability > this (uint8 inputs are read as value/255).")
    thres_small_instances: int = Field(100, ge=0, description="Objects smaller than this many voxels (global size) are removed.")
    connectivity: Literal[6, 18, 26] = Field(26, description="Beyond the design. Voxel connectivity of the components.")
    scale_factors: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = Field(
        (1.0, 1.0, 1.0), description="Resample the output by these factors (z, y, x; nearest neighbour)."
    )
    remove_small_mode: Literal["background"] = Field("background", description="What removed objects become: `background` (0).")
    instance_mode: Literal["auto", "connected_components", "contour", "distance"] = Field(
        "auto", description="Beyond the design. How instances are made (docs/tuning.md): `connected_components` of the "
        "foreground (Catena's method); `contour`: seeds where foreground > `thres_seed` and contour <= `thres_contour`, "
        "grown into the foreground (for models with a contour target); `distance`: seeds where the foreground lies "
        "at least `seed_distance` nm inside the mask, grown likewise (for foreground-only models); `auto`: `contour` "
        "when a contour prediction is given or listed by the prediction's `catena_targets`, else `connected_components`.")
    input_contour_path: str | None = Field(
        None, description="Beyond the design. `contour` mode: the contour probabilities (Zarr array URL or TIFF, "
        "the shape of the foreground); default: beside the prediction, `<input_prediction_path>_contour`.")
    thres_seed: float = Field(0.8, ge=0, le=1, description="Beyond the design. `contour` mode: a seed voxel has "
                              "foreground probability > this (and > `thres_foreground`).")
    thres_contour: float = Field(0.3, ge=0, le=1, description="Beyond the design. `contour` mode: a seed voxel has "
                                 "contour probability <= this.")
    thres_small_seeds: int = Field(8, ge=0, description="Beyond the design. `contour`/`distance` modes: seeds "
                                   "(connected components of seed voxels) smaller than this many voxels (global "
                                   "size) are dropped before growing.")
    grow_distance: int = Field(8, ge=0, description="Beyond the design. `contour`/`distance` modes: a foreground "
                               "voxel takes the id of the nearest seed by geodesic distance inside the foreground "
                               "(steps under `connectivity`, ties to the smaller id) when it is at most this many "
                               "steps away, else 0; also the halo (voxels) each block reads.")
    unseeded_components: bool = Field(True, description="Beyond the design. `contour`/`distance` modes: each "
                                      "connected component of the foreground (under `connectivity`) that holds no "
                                      "grown voxel (no seed voxel, or only seeds under `thres_small_seeds`: a thin "
                                      "piece all contour, a sliver cut by the volume's face) is an object of its "
                                      "own, numbered after the seeded objects by first voxel and kept or removed "
                                      "by `thres_small_instances` like them; false: such components stay "
                                      "background (pytorch_connectomics' `bc_watershed`). Voxels of a seeded "
                                      "component beyond `grow_distance` stay background either way.")
    seed_distance: float = Field(40.0, gt=0, description="Beyond the design. `distance` mode: a seed voxel has no "
                                 "background voxel closer than this (nm, Euclidean, by the input's resolution; "
                                 "outside the volume counts as foreground).")
    pyramid_levels: int = Field(0, ge=0, le=16, description="Beyond the design. Coarser resolution levels (mode-downsampled) to build after relabel completes (see docs/viewing.md); 0: none. Zarr output only.")

    @field_validator("chunk_size", "overlap", "scale_factors", mode="before")
    @classmethod
    def _triples(cls, v: Any) -> Any:
        return _broadcast_triple(v)

    @model_validator(mode="after")
    def _pyramid_needs_zarr(self):
        if self.pyramid_levels and self.output_format != "zarr":
            raise ValueError(f"pyramid_levels {self.pyramid_levels} needs output_format 'zarr' (got {self.output_format!r})")
        return self


class PyramidConfig(JobConfig):
    """``catena-mito pyramid``: coarser OME-NGFF resolution levels of volumes, block-wise."""

    volumes: list[str] = Field(..., min_length=1, description="Volume URLs (e.g. `<dataset>/volumes/raw`), each an OME-NGFF multiscale group written by this version.")
    levels: int = Field(..., ge=1, le=16, description="Coarser levels to build after level 0; each reduces the finest axes by 2 (see docs/viewing.md).")
    method: Literal["auto", "mean", "mode"] = Field("auto", description="`mean` (images, probabilities), `mode` (instance ids: the most frequent id, ties to the smaller id); `auto`: `mode` for label images, else `mean`.")
    block_shape: PositiveTriple | None = Field(None, description="Output block per unit of work (z, y, x voxels of each level), a multiple of the level's chunks; default: 2 chunks per axis.")

    @field_validator("block_shape", mode="before")
    @classmethod
    def _triples_pyramid(cls, v: Any) -> Any:
        return _broadcast_triple(v)


ConfigT = TypeVar("ConfigT", bound=JobConfig)


# --- loading --------------------------------------------------------------------------------


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` → ``(["a", "b"], yaml-parsed value)``."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r} as YAML") from e
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    data = dict(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a mapping")
            else:
                child = dict(child)
            node[part] = child
            node = child
        node[path[-1]] = value
    return data


def _check_unknown_keys(cls: type[JobConfig], data: Mapping[str, Any], source: str) -> None:
    known = list(cls.model_fields)
    for key in data:
        if key not in cls.model_fields:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(known))}"
            raise ConfigError(f"{source}: unknown key {key!r} for {cls.__name__}{hint}")


def _format_validation_error(e: ValidationError, source: str) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if not loc:  # a check across fields: its message names them
            parts.append(msg)
            continue
        if err["type"] == "missing" and len(err["loc"]) > 1 and isinstance(err["loc"][-1], int):
            loc, msg = str(err["loc"][0]), "expected 3 values (z, y, x)"
        value = err.get("input")
        shown = "" if isinstance(value, dict) or err["type"] == "missing" else f" (got {redact(value)!r})"
        parts.append(f"field {loc!r}: {msg}{shown}")
    return f"{source}: " + "; ".join(parts)


def config_from_dict(
    cls: type[ConfigT], data: Mapping[str, Any], source: str = "config"
) -> ConfigT:
    """Validate ``data`` as ``cls``; every problem becomes one :class:`ConfigError` line."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    _check_unknown_keys(cls, data, source)
    try:
        return cls.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def read_config_data(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML config (a local path or any fsspec URL) as a mapping."""
    shown = storage.redact_url(url)
    try:
        text = storage.read_bytes(url, storage_options).decode("utf-8")
    except StorageError as e:
        raise ConfigError(f"config file: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {shown!r} is not UTF-8 text") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {shown!r}: YAML syntax error{where}: {problem}") from None
    if data is None:
        raise ConfigError(f"config file {shown!r} is empty; expected a mapping of keys to values")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {shown!r}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def load_config(
    cls: type[ConfigT],
    path_or_url: str | None,
    overrides: Sequence[str] = (),
    storage_options: Mapping[str, Any] | None = None,
) -> ConfigT:
    """Load ``cls`` from a YAML file (any fsspec URL), then apply ``--set`` overrides."""
    data = read_config_data(path_or_url, storage_options) if path_or_url else {}
    data = apply_overrides(data, overrides)
    source = storage.redact_url(path_or_url) if path_or_url else "config"
    return config_from_dict(cls, data, source)


def save_resolved_config(
    config: JobConfig, url: str, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Save the resolved config (YAML, secrets redacted) at ``url``."""
    text = yaml.safe_dump(config.redacted_dict(), sort_keys=False)
    header = f"# resolved {type(config).__name__} written by catena-mito\n"
    storage.write_bytes(url, (header + text).encode(), storage_options)


def field_docs(cls: type[JobConfig]) -> list[tuple[str, str, Any, str]]:
    """``(name, type, default, description)`` of every field, for generated docs."""
    rows = []
    for name, info in cls.model_fields.items():
        annotation = getattr(info.annotation, "__name__", None) or str(info.annotation)
        default = "required" if info.is_required() else (
            info.default_factory() if info.default_factory is not None else info.default
        )
        rows.append((name, annotation.replace("typing.", ""), default, info.description or ""))
    return rows
