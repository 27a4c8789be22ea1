"""Benchmark ``catena-mito label`` against one whole-volume pass.

Figures (goals from issue 3):

1. time(label, all phases, one process, Zarr in and out) /
   time(read the whole volume + one cc3d call + global size filter + write)
   on a 512³ float32 probability volume with 128³ blocks: goal <= 1.5;
2. peak memory (VmHWM) of label at 512³ / at 256³ with blocks of ``--memory-block``
   (64³: both volumes have interior blocks; with 128³ every 256³ block touches the edge):
   goal <= 1.1 (memory is bounded by the block, not the volume).

Each measurement runs in a fresh subprocess that reports its own wall time (work only,
not interpreter start-up) and peak RSS. The input is written once to a local temp dir.

    .venv/bin/python bench/label.py [--size 512] [--small 256] [--block 128] [--memory-block 64] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys, time
import numpy as np
mode, inp, out, block, min_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
from catena_mito import storage
if mode == "label":
    import logging
    from catena_mito.config import LabelConfig
    from catena_mito.label import label
    config = LabelConfig(input_prediction_path=inp, output_instance_dir=out, chunk_size=block,
                         thres_foreground=0.5, thres_small_instances=min_size, connectivity=26)
    t = time.perf_counter()
    summary = label(config)
    elapsed = time.perf_counter() - t
    objects = summary.num_objects
else:
    import cc3d, fastremap
    t = time.perf_counter()
    values = storage.open_volume(inp)[...]
    labels, n = cc3d.connected_components(values > 0.5, connectivity=26, return_N=True)
    del values
    ids, counts = fastremap.unique(labels, return_counts=True)
    table = np.zeros(n + 1, labels.dtype)
    kept = ids[(counts >= min_size) & (ids != 0)]
    table[kept] = np.arange(1, len(kept) + 1, dtype=labels.dtype)
    labels = table[labels]
    arr = storage.create_array(out + "/mito_instances", labels.shape, np.uint32, (block,) * 3, overwrite=True)
    arr[...] = labels.astype(np.uint32, copy=False)
    elapsed = time.perf_counter() - t
    objects = len(kept)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child of a big parent
# would report the parent's peak
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": elapsed, "peak_rss": peak, "objects": int(objects)}))
"""


def write_probabilities(url: str, size: int, block: int, seed: int = 0) -> None:
    """A smooth probability volume of random blobs (mitochondria-like density ~8%).

    Written chunk by chunk; each voxel depends only on its global position, so the volume
    never sits in memory. Values: a logistic ramp across each blob's surface.
    """
    from catena_mito import storage

    rng = np.random.default_rng(seed)
    count = int(2.0e-4 * size**3 / 8)  # about 8% foreground with the radii below
    centres = rng.uniform(0, size, (count, 3))
    radii = rng.uniform(3.0, 9.0, count)
    stretch = rng.uniform(0.6, 1.6, (count, 3))  # ellipsoids, some elongated
    arr = storage.create_array(url, (size,) * 3, np.float32, (block,) * 3, overwrite=True,
                               attrs=storage.spatial_attrs((8, 8, 8)))
    reach = radii.max() * stretch.max() + 3
    for z in range(0, size, block):
        for y in range(0, size, block):
            for x in range(0, size, block):
                lo = np.array([z, y, x], float)
                hi = lo + block
                near = np.all((centres > lo - reach) & (centres < hi + reach), axis=1)
                field = np.full((block,) * 3, -np.inf, np.float32)
                for c, r, s in zip(centres[near], radii[near], stretch[near]):
                    b0 = np.maximum(np.floor(c - r * s - 3).astype(int), lo.astype(int))
                    b1 = np.minimum(np.ceil(c + r * s + 3).astype(int), hi.astype(int))
                    if np.any(b1 <= b0):
                        continue
                    g = np.ogrid[b0[0]:b1[0], b0[1]:b1[1], b0[2]:b1[2]]
                    d = np.sqrt(sum(((gi - ci) / si) ** 2 for gi, ci, si in zip(g, c, s)))
                    sl = tuple(slice(a - int(o), b - int(o)) for a, b, o in zip(b0, b1, lo))
                    np.maximum(field[sl], (r - d).astype(np.float32), out=field[sl])
                arr[z:z + block, y:y + block, x:x + block] = 1.0 / (1.0 + np.exp(-field))


def run_child(mode: str, inp: str, out: str, block: int, min_size: int) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, mode, inp, out, str(block), str(min_size)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--small", type=int, default=256)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--memory-block", type=int, default=64, help="blocks of the peak-memory runs")
    parser.add_argument("--min-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2, help="timing runs each (best is kept)")
    parser.add_argument("--keep", help="directory for the inputs (reused when present)")
    args = parser.parse_args()

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="catena-bench-label-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        inputs = {}
        for size in (args.size, args.small):
            url = str(tmp / f"probs{size}.zarr")
            if not (Path(url) / "zarr.json").exists():
                t = time.perf_counter()
                write_probabilities(url, size, args.block)
                print(f"wrote {size}³ input in {time.perf_counter() - t:.1f} s", flush=True)
            inputs[size] = url

        def best(mode: str, size: int, block: int = args.block) -> dict:
            runs = []
            for k in range(args.repeats):
                out = tmp / f"out-{mode}-{size}-{k}.zarr"
                shutil.rmtree(out, ignore_errors=True)
                runs.append(run_child(mode, inputs[size], str(out), block, args.min_size))
                shutil.rmtree(out, ignore_errors=True)
            return min(runs, key=lambda r: r["seconds"]) | {"peak_rss": max(r["peak_rss"] for r in runs)}

        base = best("baseline", args.size)
        ours = best("label", args.size)
        big = best("label", args.size, args.memory_block)
        small = best("label", args.small, args.memory_block)
        if base["objects"] != ours["objects"]:
            raise SystemExit(f"object counts differ: baseline {base['objects']}, label {ours['objects']}")
        ratio_t = ours["seconds"] / base["seconds"]
        ratio_m = big["peak_rss"] / small["peak_rss"]
        mib = 2**20
        print(f"\nvolume {args.size}³ float32, blocks {args.block}³, 26-connectivity, "
              f"{ours['objects']} objects >= {args.min_size} voxels")
        print(f"  whole-volume pass (read + cc3d + size filter + write): {base['seconds']:.2f} s, "
              f"peak RSS {base['peak_rss'] / mib:.0f} MiB")
        print(f"  catena-mito label --phase all:                         {ours['seconds']:.2f} s, "
              f"peak RSS {ours['peak_rss'] / mib:.0f} MiB")
        for size, r in ((args.size, big), (args.small, small)):
            print(f"  catena-mito label at {size}³, blocks {args.memory_block}³:            {r['seconds']:.2f} s, "
                  f"peak RSS {r['peak_rss'] / mib:.0f} MiB")
        print(f"time ratio label / whole pass:        {ratio_t:.2f}  (goal <= 1.5)")
        print(f"peak RSS ratio {args.size}³ / {args.small}³ (blocks {args.memory_block}³): {ratio_m:.2f}  (goal <= 1.1)")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
