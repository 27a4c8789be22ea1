"""Time synthetic-volume generation and report its statistics.

Usage: python bench/synthetic.py [--sizes 256 512] [--seed 0]

Prints, per cubic size: the time to write the dataset to a local Zarr store (render and
compress, chunk by chunk, as ``catena-mito synth`` does), the mitochondria fraction, the
number of mitochondria and neurons, and the best foreground IoU any global intensity
threshold reaches (both polarities, all 256 levels) -- which should stay well below 0.5.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from catena_mito import storage  # noqa: E402
from catena_mito.synthetic import best_global_threshold_iou, write_synthetic_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"cpus: {os.cpu_count()}")
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            url = os.path.join(tmp, "synth.zarr")
            t0 = time.perf_counter()
            write_synthetic_dataset(url, shape=(n, n, n), seed=args.seed)
            elapsed = time.perf_counter() - t0
            root = storage.open_group(url)
            # statistics on at most 256 slices keep the check itself cheap for 512³
            slab = slice(0, min(n, 256))
            raw = root[storage.RAW_PATH][slab]
            mito = root[storage.LABEL_PATHS["mito"]][slab]
            neurons = root[storage.LABEL_PATHS["neuron"]][slab]
            iou, polarity, level = best_global_threshold_iou(raw, mito > 0)
            print(
                f"{n}³: {elapsed:6.1f} s  ({n**3 / elapsed / 1e6:.2f} Mvoxel/s)  "
                f"mito fraction {np.mean(mito > 0):.3f}  "
                f"mitochondria {len(np.unique(mito)) - 1}  neurons {len(np.unique(neurons))}  "
                f"best global threshold IoU {iou:.3f} (raw {polarity} {level})"
                + ("" if slab.stop == n else f"  [stats on z < {slab.stop}]")
            )


if __name__ == "__main__":
    main()
