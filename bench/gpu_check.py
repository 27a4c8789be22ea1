"""GPU checks: bf16 autocast, predict and train throughput on CUDA, the DDP launch path.

Run on a machine with a CUDA GPU, from the repository root, as one command:

    python bench/gpu_check.py --out /tmp/gpu-check      # about 3-5 minutes on one H200

The package's dependencies must be importable there (``pip install -e .``; on a machine
without an index, install wheels of monai, zarr, numcodecs, pydantic, fastremap,
connected-components-3d carried from elsewhere). It prints one JSON object per check and
exits 1 when a check fails. What it measures:

- ``amp``: the default backbones under bf16 autocast run their convolutions in bf16, and
  their probabilities stay within 0.05 of fp32;
- ``predict``: windows/s of the real block-wise predict at 256³ (default monai_unet,
  patch 128³) with and without ``amp``, and its ratio to a bare forward loop over the
  same windows (the CPU bench's ratio, on a GPU);
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


def check_predict(root: Path) -> bool:
    from catena_mito.checkpoint import make_payload, save_checkpoint
    from catena_mito.config import PredictConfig
    from catena_mito.models import build_model
    from catena_mito.predict import predict

    data = _dataset(root, (256, 256, 256), seed=3)
    torch.manual_seed(0)
    model = build_model("monai_unet")
    ckpt = str(root / "untrained.pth")
    save_checkpoint(ckpt, make_payload("monai_unet", {}, model, config={
        "patch_size": [128, 128, 128], "stride": [64, 64, 64], "clahe": False,
        "original_res": [8, 8, 8], "target_res": [8, 8, 8], "label_type": "mito"}))
    figures, ok = {}, True
    for amp in (False, True):
        cfg = PredictConfig(model_path=ckpt, test_zarr_dirs=[data], output_dir=str(root / f"pred-{amp}"),
                            block_shape=(256, 256, 256), output_chunks=(64, 64, 64), batch_size=4,
                            device="cuda", amp=amp, num_workers=2)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        summary = predict(cfg)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        windows = sum(o["windows_run"] for o in summary["outputs"])
        figures[f"windows_per_s_amp_{amp}"] = round(windows / seconds, 2)
        # the same number of windows through the bare model, batches of 4
        net = model.cuda().eval()
        x = torch.rand(4, 1, 128, 128, 128, device="cuda")
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else torch.autocast("cuda", enabled=False)
        with torch.inference_mode(), ctx:
            net(x)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(-(-windows // 4)):
                torch.softmax(net(x).float(), 1)
            torch.cuda.synchronize()
        pure = time.perf_counter() - t0
        figures[f"predict_over_forward_amp_{amp}"] = round(seconds / pure, 3)
        ok &= windows > 0
    return report("predict", ok, volume=[256, 256, 256], patch=[128, 128, 128], **figures)


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
    results = [check_amp(), check_predict(root), check_train(root), check_ddp(root)]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
