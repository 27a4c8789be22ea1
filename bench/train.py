"""Benchmark the training data pipeline: how much a real training step costs over pure compute.

Figure (goal from issue 4)::

    overhead = time(N training steps through the real pipeline)
             / time(the same N optimisation steps on the same batches, already in memory)
    goal <= 1.10

"Real pipeline" = :class:`catena_mito.data.EpochSampler` → :class:`PatchDataset` (patch
cut from the in-memory volume, rotation/flip and MONAI contrast augmentation) → the
PyTorch DataLoader (collation; ``--num-workers`` worker processes) → host-to-device copy →
:func:`catena_mito.train.train_step`. "Pure compute" = :func:`train_step` alone on the
batches the pipeline produced, collected beforehand. Both start from the same weights,
after the same warm-up steps; reading the dataset (once per run) is reported separately.

    .venv/bin/python bench/train.py [--model-type monai_unet] [--size 96] [--patch 32]
        [--batch 2] [--steps 20] [--num-workers 0] [--device cpu] [--channels 8 16 32]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-type", default="monai_unet", choices=["monai_unet", "rs_unet"])
    parser.add_argument("--size", type=int, default=96, help="synthetic volume edge (voxels)")
    parser.add_argument("--patch", type=int, default=32, help="patch edge (voxels)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from catena_mito.config import TrainConfig
    from catena_mito.data import Augmenter, EpochSampler, PatchDataset, VolumeCache, plan_patches
    from catena_mito.models import build_model
    from catena_mito.synthetic import write_synthetic_dataset
    from catena_mito.train import build_loss, resolve_device, seed_everything, train_step

    levels = len(args.channels)
    params = {"channels": args.channels}
    if args.model_type == "monai_unet":
        params["strides"] = [2] * (levels - 1)
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        url = write_synthetic_dataset(f"{tmp}/bench.zarr", shape=(args.size,) * 3, seed=1, chunks=(64, 64, 64))
        config = TrainConfig(
            train_zarr_dirs=[url], patch_size=args.patch, stride=args.patch // 2,
            batch_size=args.batch, model_type=args.model_type, model_params=params,
        )
        t = time.perf_counter()
        volumes = [VolumeCache(config.label_type).get(url)]
        read_s = time.perf_counter() - t

    patches = plan_patches(volumes, config.patch_size, config.stride)
    dataset = PatchDataset(volumes, patches, config.patch_size, Augmenter(True, True), seed=0)
    total = args.warmup + args.steps
    sampler = EpochSampler(len(patches), seed=0, draws_per_rank=total * args.batch)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch, sampler=sampler, num_workers=args.num_workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )

    seed_everything(0)
    initial = build_model(args.model_type, **params)
    loss_fn = build_loss("DiceCE", None, 2).to(device)

    def fresh():
        model = copy.deepcopy(initial).to(device).train()
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # 1. the real pipeline: loader + augmentation + transfer + step
    model, optimizer = fresh()
    batches = []
    it = iter(loader)
    for _ in range(args.warmup):
        image, label = next(it)
        train_step(model, image, label, loss_fn, optimizer, device)
    sync()
    t = time.perf_counter()
    for image, label in it:
        train_step(model, image, label, loss_fn, optimizer, device)
        batches.append((image, label))
    sync()
    pipeline_s = time.perf_counter() - t

    # 2. pure compute on the same batches, already in memory (on the device)
    model, optimizer = fresh()
    on_device = [(i.to(device), lab.to(device)) for i, lab in batches]
    for image, label in on_device[: args.warmup]:
        train_step(model, image, label, loss_fn, optimizer, device)
    sync()
    t = time.perf_counter()
    for image, label in on_device:
        train_step(model, image, label, loss_fn, optimizer, device)
    sync()
    compute_s = time.perf_counter() - t

    n = len(batches)
    print(f"model {args.model_type} channels {args.channels}, patch {args.patch}³, batch {args.batch}, "
          f"{args.num_workers} workers, device {device}, torch threads {torch.get_num_threads()}")
    print(f"dataset read once: {read_s:.2f} s ({args.size}³, raw + labels)")
    print(f"training step, real pipeline : {pipeline_s / n * 1000:8.1f} ms/step ({n} steps)")
    print(f"forward+backward, in memory  : {compute_s / n * 1000:8.1f} ms/step")
    print(f"overhead ratio               : {pipeline_s / compute_s:8.3f}   (goal <= 1.10)")


if __name__ == "__main__":
    main()
