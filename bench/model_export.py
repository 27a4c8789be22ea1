"""Exported models against their checkpoints (issue 15, part 7).

For each backbone at its default size: a checkpoint with random weights and non-trivial
batch-norm statistics, exported with ``export_model(..., onnx=True)``; printed are the
largest differences of foreground probabilities on the export's check patches (two
uniform random patches) for TorchScript and for ONNX under ONNX Runtime (CPU, float32),
PyTorch's own float32 error (against float64) and the file sizes. Differences are
properties of the kernels, not of machine load. Measured (CPU, 32x64x64):

    monai_unet: TorchScript 0, ONNX 1.13e-06; model.pt 2.5 MiB, model.onnx 2.4 MiB
    rs_unet:    TorchScript 0, ONNX 4.25e-04, float32 vs float64 4.7e-04 (random weights:
                logits up to ~900); model.pt 7.5 MiB, model.onnx 7.3 MiB

    .venv/bin/python bench/model_export.py [--patch 32 64 64]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from catena_mito.checkpoint import make_payload, save_checkpoint
from catena_mito.model_export import export_model
from catena_mito.models import MODEL_TYPES, build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch", nargs=3, type=int, default=(32, 64, 64))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in MODEL_TYPES:
            torch.manual_seed(0)
            model = build_model(model_type)
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, torch.nn.BatchNorm3d):
                        m.running_mean.uniform_(-0.2, 0.2)
                        m.running_var.uniform_(0.05, 0.2)
            ckpt = str(Path(tmp) / f"{model_type}.pth")
            save_checkpoint(ckpt, make_payload(model_type, {}, model, config={"patch_size": list(args.patch)}))
            out = Path(tmp) / model_type
            card = export_model(ckpt, str(out), onnx=True)
            v = card["verification"]
            sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in sorted(out.glob("model.*")))
            print(f"{model_type:11s} patch {list(args.patch)}: max |dp| TorchScript {v['torchscript']:.3g}, "
                  f"ONNX {v['onnx']:.3g}, PyTorch float32 vs float64 {v['float32_error']:.3g} "
                  f"(tolerances {v['torchscript_tolerance']:g} / {v['onnx_tolerance']:.3g}); {sizes}")


if __name__ == "__main__":
    main()
