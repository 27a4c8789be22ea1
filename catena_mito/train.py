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
optimisation steps per epoch instead. Adam runs at ``learning_rate``; with ``hotstart``
the first :data:`HOTSTART_EPOCHS` (50) epochs use ``learning_rate`` and every later epoch
``learning_rate_after_hotstart_50`` (without ``hotstart`` the second rate is unused). The
loss is MONAI's ``DiceLoss`` or ``DiceCELoss`` on the softmax of the logits with one-hot
targets; ``loss_weights`` (one per class, ``[background, foreground]``) weight both the
Dice terms and, for ``DiceCE``, the cross-entropy.

Validation (``test_zarr_dirs``) runs every ``eval_interval`` epochs and after the last, on
whole volumes, through :func:`catena_mito.inference.sliding_window_predict` - the code
path ``predict`` uses - with the training patch size as window and half of it as step
(predict's defaults), thresholded at 0.5. Without validation data there is no
``best.pth``.

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
  bf16. CPU: ``batch_size >= 2``.

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
bf16, forward passes run under bf16 autocast (no loss scaling needed); the loss is
computed in float32. Multi-GPU data parallel::

    torchrun --nproc_per_node=K -m catena_mito train --config train.yaml

initialises a process group when ``WORLD_SIZE > 1`` (NCCL on CUDA, Gloo on CPU), gives
each rank its share of every epoch's patches (``batch_size`` is per rank), and lets only
rank 0 validate and write. Batch-norm running statistics are averaged over the ranks after
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


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-epoch schedule (step it once after each epoch) following :func:`learning_rate_at`."""
    base = config.learning_rate

    def factor(epoch: int) -> float:
        return learning_rate_at(config, epoch) / base

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_loss(loss_type: str, loss_weights: Sequence[float] | None, num_classes: int) -> nn.Module:
    """MONAI ``DiceLoss`` or ``DiceCELoss`` (softmax over logits, one-hot targets).

    Raises:
        ConfigError: unknown ``loss_type``, or ``loss_weights`` not one per class.
    """
    from monai.losses import DiceCELoss, DiceLoss

    weight = None
    if loss_weights is not None:
        if len(loss_weights) != num_classes:
            raise ConfigError(
                f"loss_weights: expected {num_classes} values (one per class: background, "
                f"foreground), got {list(loss_weights)}"
            )
        weight = torch.tensor([float(w) for w in loss_weights], dtype=torch.float32)
    if loss_type == "DiceLoss":
        return DiceLoss(to_onehot_y=True, softmax=True, weight=weight)
    if loss_type == "DiceCE":
        return DiceCELoss(to_onehot_y=True, softmax=True, weight=weight)
    raise ConfigError(f"loss_type: expected 'DiceLoss' or 'DiceCE', got {loss_type!r}")


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on a CUDA device that supports it when ``amp``; otherwise nothing."""
    if amp and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    model: nn.Module,
    image: torch.Tensor,
    label: torch.Tensor,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    amp: bool = False,
) -> torch.Tensor:
    """One optimisation step on a batch ``(N, 1, z, y, x)``; returns the detached loss."""
    image = image.to(device, non_blocking=True)
    label = label.to(device, non_blocking=True).long()
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, amp):
        logits = model(image)
    loss = loss_fn(logits.float(), label)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def evaluate(
    model: nn.Module,
    volumes: Sequence[TrainingVolume],
    patch_size: Sequence[int],
    *,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    amp: bool = False,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Full-volume sliding-window Dice/IoU of ``model`` on ``volumes``.

    Returns the metrics (``val_dice``/``val_iou`` pooled over all volumes, and per volume)
    and the foreground probability of the first volume, (z, y, x), for the preview.
    """
    from catena_mito.inference import sliding_window_predict

    net = _unwrap(model)
    was_training = net.training
    net.eval()
    total = ConfusionCounts()
    per_volume: dict[str, dict[str, float]] = {}
    first_prob = None
    try:
        for vol in volumes:
            prob = sliding_window_predict(
                net, vol.raw, tuple(patch_size), None,  # None: predict's default stride
                batch_size=batch_size, device=str(device), amp=amp,
            )
            counts = confusion_counts(prob > 0.5, vol.label)
            total = total + counts
            per_volume[vol.url] = {"dice": counts.dice, "iou": counts.iou}
            if first_prob is None:
                first_prob = prob
    finally:
        net.train(was_training)
    return {"val_dice": total.dice, "val_iou": total.iou, "val_volumes": per_volume}, first_prob


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

    ckpt = load_checkpoint(url, storage.resolve_storage_options(url, config.storage_options), map_location="cpu")
    if ckpt["model_type"] != config.model_type:
        raise CheckpointError(
            f"{field_name}: {storage.redact_url(url)} holds a {ckpt['model_type']!r} model but "
            f"model_type is {config.model_type!r}"
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
    from catena_mito.models import build_model, check_patch_size

    run_url = storage.join_url(config.runs_dir, config.exp_name)
    config = resolve_auto_resume(config, run_url)
    check_patch_size(config.model_type, config.model_params, config.patch_size)
    _check_fresh_run(config, run_url)

    with _distributed(config.device) as (dist_info, device):
        seed_everything(config.seed)
        writer = _RunWriter(run_url, config, active=dist_info.main)

        # Data: every dataset read once, preprocessed like predict.
        cache = VolumeCache(
            config.label_type, original_res=config.original_res, target_res=config.target_res,
            clahe=config.clahe, storage_options=config.storage_options,
        )
        train_volumes = [cache.get(url) for url in config.train_zarr_dirs]
        val_volumes = [cache.get(url) for url in config.test_zarr_dirs] if dist_info.main else []
        if not config.test_zarr_dirs:
            log.warning("no test_zarr_dirs: no validation, no best.pth")
        patches = plan_patches(
            train_volumes, config.patch_size, config.stride,
            balance_patches=config.balance_patches, min_positive_pixels=config.min_positive_pixels,
            subsample_frac=config.subsample_frac, subsample_number=config.subsample_number,
            subsample_seed=config.subsample_seed,
        )
        dataset = PatchDataset(
            train_volumes, patches, config.patch_size,
            Augmenter(config.rotation_augs, config.contrast_augs), seed=config.seed,
        )
        sampler = EpochSampler(
            len(patches), seed=config.seed, rank=dist_info.rank, world_size=dist_info.world_size,
            draws_per_rank=config.steps_per_epoch * config.batch_size if config.steps_per_epoch else None,
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
        model = build_model(config.model_type, **config.model_params)
        resume = None
        if config.resume_checkpoint:
            resume = _load_checkpoint_for(config, config.resume_checkpoint, "resume_checkpoint")
            _load_weights(model, resume, config.resume_checkpoint, "resume_checkpoint")
            if config.model_loc:
                log.info("resume_checkpoint given: model_loc is not reloaded (the resumed weights include it)")
        elif config.model_loc:
            ckpt = _load_checkpoint_for(config, config.model_loc, "model_loc")
            _load_weights(model, ckpt, config.model_loc, "model_loc")
        if config.freeze_encoder:
            freeze_encoder(model, config.model_type)
        model.to(device)
        loss_fn = build_loss(config.loss_type, config.loss_weights, _num_classes(config)).to(device)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
        scheduler = make_scheduler(optimizer, config)
        start_epoch, best = 0, None
        if resume is not None:
            try:
                optimizer.load_state_dict(resume["optimizer"])
                scheduler.load_state_dict(resume["scheduler"])
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(
                    f"resume_checkpoint: {storage.redact_url(config.resume_checkpoint or '')}: "
                    f"optimizer/scheduler state does not fit this config ({e}); was "
                    "freeze_encoder or the model changed?"
                ) from e
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
            dist_info, writer, val_volumes, start_epoch, best,
        )
        if dist_info.enabled:
            _check_replicas(model, dist_info, writer)
        return result


def _num_classes(config: TrainConfig) -> int:
    from catena_mito.models import resolve_model_params

    return int(resolve_model_params(config.model_type, config.model_params)["out_channels"])


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
    try:
        for epoch in range(start_epoch, config.epochs):
            sampler.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            started = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            steps = 0
            for image, label in loader:
                loss_sum += train_step(model, image, label, loss_fn, optimizer, device, config.amp)
                steps += 1
                progress.update(1)
                if steps % 10 == 0:
                    progress.set_postfix(epoch=epoch + 1, loss=f"{loss_sum.item() / steps:.4f}")
            scheduler.step()
            if dist_info.enabled:
                _average_buffers(model, dist_info)
            done = completed = epoch + 1
            record: dict[str, Any] = {
                "epoch": done, "train_loss": loss_sum.item() / max(steps, 1), "lr": lr,
                "steps": steps, "time_s": round(time.perf_counter() - started, 3),
            }
            evaluate_now = bool(val_volumes) and (done % config.eval_interval == 0 or done == config.epochs)
            improved = False
            if dist_info.main and evaluate_now:
                metrics, prob = evaluate(
                    model, val_volumes, config.patch_size, batch_size=config.batch_size,
                    device=device, amp=config.amp,
                )
                record.update(metrics)
                improved = best is None or metrics["val_iou"] > best
                if improved:
                    best = metrics["val_iou"]
                z = _preview_slice(val_volumes[0])
                writer.save_preview(done, preview_png(val_volumes[0].raw[z], val_volumes[0].label[z], prob[z]))
                progress.write(
                    f"epoch {done}: loss {record['train_loss']:.4f}, val dice "
                    f"{metrics['val_dice']:.4f}, val IoU {metrics['val_iou']:.4f}",
                    file=sys.stderr,
                )
            dist_info.barrier()  # other ranks wait for rank 0's validation
            record["best_val_iou"] = best
            writer.log_metrics(record)
            if dist_info.main:
                payload = make_payload(
                    config.model_type, config.model_params, _unwrap(model), optimizer, scheduler,
                    epoch=done, best_metric=best, config=config.redacted_dict(),
                    rng=capture_rng_state(),
                )
                names = ["last.pth"]
                if improved:
                    names.append("best.pth")
                if done % config.ckpt_interval == 0:
                    names.append(f"epoch_{done:04d}.pth")
                writer.save_checkpoint(names, payload)
    finally:
        progress.close()
    return TrainResult(
        run_url=writer.run_url, epochs_completed=completed, best_metric=best,
        history=list(writer.history),
    )


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
