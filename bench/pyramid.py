"""Pyramid cost and exactness on a synthetic volume: one process vs sharded, level by level.

Builds ``--levels`` levels of raw (mean) and of the ground-truth ids (mode) of a synthetic
dataset, once in one process and once as ``--shards`` shards run level by level (as
consecutive array jobs would) with another block shape; prints per level the shape,
blocks, voxels relative to level 0, whether the sharded bytes equal the single-process
bytes, and the wall time of each build. Times are wall-clock on a shared machine: compare
the ratios of one run, not absolute numbers across runs.

    .venv/bin/python bench/pyramid.py [--shape 128 256 256] [--levels 3] [--shards 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from catena_mito import storage
from catena_mito.config import PyramidConfig
from catena_mito.pyramid import build_pyramid
from catena_mito.synthetic import write_synthetic_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 256, 256))
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        urls = []
        for name in ("single", "sharded"):
            url = write_synthetic_dataset(f"{tmp}/{name}.zarr", shape=tuple(args.shape), seed=0,
                                          resolution=(8, 8, 8), chunks=(64, 64, 64))
            urls.append(url)
        volumes = [storage.RAW_PATH, storage.LABEL_PATHS["mito"]]
        t0 = time.perf_counter()
        (raw, ids) = build_pyramid(PyramidConfig(volumes=[storage.join_url(urls[0], v) for v in volumes], levels=args.levels))
        single_s = time.perf_counter() - t0
        config = PyramidConfig(volumes=[storage.join_url(urls[1], v) for v in volumes], levels=args.levels,
                               block_shape=(64, 64, 64))
        t0 = time.perf_counter()
        for level in range(1, args.levels + 1):
            for shard in range(args.shards):
                build_pyramid(config, shard_index=shard, num_shards=args.shards, level=level)
        sharded_s = time.perf_counter() - t0
        base = float(np.prod(args.shape))
        for summary, vol in ((raw, volumes[0]), (ids, volumes[1])):
            print(f"{vol} ({summary['method']}):")
            for k, shape in enumerate(summary["shapes"][1:], start=1):
                a = storage.open_array(storage.join_url(urls[0], vol, str(k)))[...]
                b = storage.open_array(storage.join_url(urls[1], vol, str(k)))[...]
                print(f"  level {k}: shape {shape}, factor {summary['factors'][k]}, "
                      f"voxels {np.prod(shape) / base:.4f} of level 0, sharded == single: {np.array_equal(a, b)}")
        print(f"single process: {single_s:.2f} s; {args.shards} shards level by level: {sharded_s:.2f} s "
              f"(ratio {sharded_s / single_s:.2f})")


if __name__ == "__main__":
    main()
