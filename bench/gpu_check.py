"""GPU checks: bf16 autocast, predict and train throughput on CUDA, the DDP launch path.

Run on a machine with a CUDA GPU, from the repository root, as one command:

    python bench/gpu_check.py --out /tmp/gpu-check      # about 3-5 minutes on one H200

The package's dependencies must be importable there (``pip install -e .``; on a machine
without an index, install wheels of monai, zarr, numcodecs, pydantic, fastremap,
connected-components-3d carried from elsewhere). It prints one JSON object per check and
exits 1 when a check fails. What it measures:

- ``amp``: the default backbones under bf16 autocast run their convolutions in bf16, and
  their probabilities stay within 0.05 of fp32;
- ``predict``: output MVx/s of the real block-wise predict at 256³ (default settings:
  each window once; default monai_unet, patch 128³, batch 8) in fp32, bf16 and bf16 +
  channels_last, the bare forward pass's MVx/s over the same windows on this GPU, and
  their ratio;
- ``predict_gpus``: one process per GPU (``CUDA_VISIBLE_DEVICES``, one shard each) on a
  256×512×512 volume against one GPU alone, output MVx/s (process start-up included);
- ``train``: optimisation steps/s of the real training loop with ``amp`` (default
  monai_unet, patch 64³, batch 4), a finite loss and a written checkpoint;
- ``ddp``: ``torch.distributed.run --nproc_per_node=<GPUs>`` of the train command (NCCL
  when there are two or more GPUs; with one GPU it runs one process and says so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def report(name: str, ok: bool, **figures) -> bool:
    print(json.dumps({"check": name, "ok": bool(ok), **figures}), flush=True)
    return bool(ok)


def check_amp() -> bool:
    from catena_mito.models import build_model

    results = []
    for model_type in ("monai_unet", "rs_unet"):
        torch.manual_seed(0)
        model = build_model(model_type).cuda().eval()
        x = torch.rand(2, 1, 64, 64, 64, device="cuda")
        seen = []
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv3d))
        handle = conv.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.dtype))
        with torch.inference_mode():
            p32 = torch.softmax(model(x).float(), 1)[:, 1]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                p16 = torch.softmax(model(x).float(), 1)[:, 1]
        handle.remove()
        diff = float((p32 - p16).abs().max())
        results.append(report(f"amp/{model_type}", seen[-1] == torch.bfloat16 and diff < 0.05,
                              conv_dtype=str(seen[-1]), max_abs_prob_diff=round(diff, 5)))
    return all(results)


def _dataset(root: Path, shape, seed: int) -> str:
    from catena_mito.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(str(root / f"synth-{seed}-{shape[0]}.zarr"), shape=shape, seed=seed,
                                   chunks=(64, 64, 64))


def _predict_config(ckpt: str, data: str, out: str, **kw):
    from catena_mito.config import PredictConfig

    return PredictConfig(model_path=ckpt, test_zarr_dirs=[data], output_dir=out, device="cuda",
                         batch_size=8, num_workers=4, **kw)


def _bare_forward_seconds(model, windows: int, batch: int, patch: int, precision: str, channels_last: bool) -> float:
    """The bare model over ``windows`` windows (full batches), in the same precision."""
    net = model.cuda().eval()
    x = torch.rand(batch, 1, patch, patch, patch, device="cuda")
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    ctx = torch.autocast("cuda", dtype=dtype) if dtype else torch.autocast("cuda", enabled=False)
    with torch.inference_mode(), ctx:
        net(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(-(-windows // batch)):
            net(x)
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def check_predict(root: Path) -> bool:
    """Predict output MVx/s (default settings: exchange, block 256³ for patch 128) against the
    bare forward pass of the same windows on this GPU, in fp32, bf16 and bf16 + channels_last."""
    from catena_mito.checkpoint import make_payload, save_checkpoint
    from catena_mito.models import build_model
    from catena_mito.predict import predict

    shape = (256, 256, 256)
    data = _dataset(root, shape, seed=3)
    torch.manual_seed(0)
    model = build_model("monai_unet")
    ckpt = str(root / "untrained.pth")
    save_checkpoint(ckpt, make_payload("monai_unet", {}, model, config={
        "patch_size": [128, 128, 128], "stride": [64, 64, 64], "clahe": False,
        "original_res": [8, 8, 8], "target_res": [8, 8, 8], "label_type": "mito"}))
    figures, ok = {}, True
    mvx = float(np.prod(shape)) / 1e6
    for name, kw in (("fp32", {"precision": "fp32"}), ("bf16", {"precision": "bf16"}),
                     ("bf16_channels_last", {"precision": "bf16", "channels_last": True})):
        predict(_predict_config(ckpt, data, str(root / "warm"), **kw), overwrite=True)  # cuDNN autotune, caches
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        summary = predict(_predict_config(ckpt, data, str(root / f"pred-{name}"), **kw))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        windows = sum(o["windows_run"] for o in summary["outputs"])
        bare = _bare_forward_seconds(model, windows, 8, 128, kw["precision"], kw.get("channels_last", False))
        figures[f"{name}_output_mvx_per_s"] = round(mvx / seconds, 2)
        figures[f"{name}_bare_forward_mvx_per_s"] = round(mvx / bare, 2)
        figures[f"{name}_predict_over_bare_forward"] = round(seconds / bare, 3)
        figures[f"{name}_windows"] = windows
        ok &= windows > 0
    figures["bf16_over_fp32_speed"] = round(figures["bf16_output_mvx_per_s"] / figures["fp32_output_mvx_per_s"], 3)
    return report("predict", ok, volume=list(shape), patch=[128, 128, 128], batch=8, **figures)


def check_predict_gpus(root: Path) -> bool:
    """One process per GPU, one shard each (CUDA_VISIBLE_DEVICES), against one GPU alone:
    output MVx/s of the whole volume (bf16, defaults)."""
    gpus = torch.cuda.device_count()
    shape = (256, 512, 512)
    data = _dataset(root, shape, seed=5)
    ckpt = str(root / "untrained.pth")
    mvx = float(np.prod(shape)) / 1e6
    figures = {}
    for count in sorted({1, gpus}):
        out = root / f"pred-gpus-{count}"
        cfg = root / f"gpus-{count}.yaml"
        cfg.write_text(yaml.safe_dump({"model_path": ckpt, "test_zarr_dirs": [data], "output_dir": str(out),
                                       "device": "cuda", "batch_size": 8, "num_workers": 4, "precision": "bf16"}))
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-m", "catena_mito", "predict", "--config", str(cfg),
                                   "--shard-index", str(g), "--num-shards", str(count)], cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": str(g)},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for g in range(count)]
        errors = [p.communicate(timeout=1800)[1] for p in procs]
        seconds = time.perf_counter() - t0
        if any(p.returncode for p in procs):
            return report("predict_gpus", False, gpus=count, stderr_tail=errors[0][-400:])
        figures[f"gpus_{count}_output_mvx_per_s"] = round(mvx / seconds, 2)  # with process start-up
    if gpus > 1:
        figures["speedup_all_over_one"] = round(figures[f"gpus_{gpus}_output_mvx_per_s"]
                                                / figures["gpus_1_output_mvx_per_s"], 3)
    return report("predict_gpus", True, gpus=gpus, volume=list(shape),
                  note="one GPU: nothing to compare" if gpus == 1 else "", **figures)


def _train_config(root: Path, name: str, data: str) -> dict:
    return {"exp_name": name, "runs_dir": str(root / "runs"), "train_zarr_dirs": [data],
            "test_zarr_dirs": [], "patch_size": [64, 64, 64], "stride": [32, 32, 32],
            "batch_size": 4, "epochs": 2, "steps_per_epoch": 50, "device": "cuda", "amp": True,
            "num_workers": 2, "model_type": "monai_unet"}


def check_train(root: Path) -> bool:
    from catena_mito.config import TrainConfig
    from catena_mito.train import train

    data = _dataset(root, (128, 128, 128), seed=4)
    result = train(TrainConfig(**_train_config(root, "gpu-train", data)))
    last = result.history[-1]
    steps_per_s = last["steps"] / last["time_s"]
    ok = np.isfinite(last["train_loss"]) and (root / "runs" / "gpu-train" / "last.pth").exists()
    return report("train", ok, steps_per_s=round(steps_per_s, 2), patch=[64, 64, 64], batch=4,
                  loss=round(float(last["train_loss"]), 4))


def check_ddp(root: Path) -> bool:
    gpus = torch.cuda.device_count()
    data = _dataset(root, (128, 128, 128), seed=4)
    cfg = root / "ddp.yaml"
    cfg.write_text(yaml.safe_dump({**_train_config(root, "gpu-ddp", data), "epochs": 1}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "-m", "catena_mito", "train", "--config", str(cfg)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    note = "NCCL across GPUs" if gpus > 1 else "one GPU: one process, no process group"
    return report("ddp", out.returncode == 0, processes=gpus, seconds=round(time.perf_counter() - t0, 1),
                  note=note, stderr_tail=out.stderr[-400:] if out.returncode else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/catena-gpu-check", help="Scratch folder.")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        report("cuda", False, reason="torch sees no CUDA device")
        return 1
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    report("cuda", True, torch=torch.__version__, device=torch.cuda.get_device_name(0),
           gpus=torch.cuda.device_count(), bf16=torch.cuda.is_bf16_supported())
    results = [check_amp(), check_predict(root), check_predict_gpus(root), check_train(root), check_ddp(root)]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
