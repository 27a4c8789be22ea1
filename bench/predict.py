"""Benchmark ``catena-mito predict`` (CPU): overhead, sharding recompute, memory.

Figures (goals from issue 5):

1. time(predict, one shard, 256³ synthetic Zarr, small MONAI U-Net, batch 2, 128³ blocks)
   / time(pure forward passes of the same windows in a loop, same batch size):
   goal <= 1.10. "The same windows" = exactly the forward passes predict makes (its
   windows per block, batches padded to full size), so the ratio is the cost of reading,
   preprocessing, blending, encoding, writing and markers; the recompute of windows shared
   by neighbouring blocks is figure 2.
2. windows computed with blocks of 128³ and 256³ (and 64³) / windows of one whole-volume
   pass (the recompute cost of sharding); pure geometry, no model run.
3. peak RSS of predict at 512³ / at 256³ with the same 128³ blocks: goal <= 1.1.
   Memory, not speed, is measured here, so this uses a *very small* U-Net
   (channels 2, 4) and stride = patch (fewer windows) to keep the 512³ run short on
   2 CPUs, on uniform-noise uint8 volumes (content does not change memory).
4. sharded == single process: the 256³ synthetic volume predicted by one process and by
   ``--shards`` processes (one shard each, one after the other, into one output) gives
   byte-identical output files (chunks and metadata; the ``.catena`` run records aside),
   and the same run id. Tiny U-Net, stride = half a patch.

Each measurement runs in a fresh subprocess that reports its own wall time (work only,
not interpreter start-up or the one-time import of torch and MONAI, ~3 s, which both sides
pay before their clock starts) and peak RSS (ru_maxrss). Figure 1 runs ``--repeats``
alternating predict/forward pairs and reports the median ratio: this machine's speed
drifts by 2-3x from one minute to the next. Inputs go to a temp dir.

    .venv/bin/python bench/predict.py [--size 256] [--big 512] [--block 128] [--repeats 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PATCH = 64
SMALL_UNET = {"channels": (8, 16, 32), "strides": (2, 2), "num_res_units": 1}
TINY_UNET = {"channels": (2, 4), "strides": (2,), "num_res_units": 0}

CHILD = r"""
import json, resource, sys, time
mode, args = sys.argv[1], json.loads(sys.argv[2])
import torch
torch.set_num_threads(args["threads"])
if mode == "predict":
    import monai.networks.nets  # noqa: F401  (imported before the clock, as the forward child does)
    from catena_mito.config import PredictConfig, config_from_dict
    from catena_mito.predict import predict
    config = config_from_dict(PredictConfig, {
        "model_path": args["ckpt"], "test_zarr_dirs": [args["data"]], "output_dir": args["out"],
        "device": "cpu", "batch_size": args["batch"], "patch_size": args["patch"],
        "stride": args["stride"], "block_shape": args["block"], "output_chunks": args["chunks"],
        "num_workers": args["workers"],
    })
    t = time.perf_counter()
    summary = predict(config, shard_index=args.get("shard", 0), num_shards=args.get("shards", 1))
    elapsed = time.perf_counter() - t
    extra = {"windows_run": summary["outputs"][0]["windows_run"]}
else:
    from catena_mito.checkpoint import build_model_from_checkpoint, load_checkpoint
    model = build_model_from_checkpoint(load_checkpoint(args["ckpt"])).eval()
    x = torch.rand(args["batch"], 1, *args["patch"])
    with torch.inference_mode():  # every call timed, the first too (as in predict)
        t = time.perf_counter()
        for _ in range(args["calls"]):
            model(x)
        elapsed = time.perf_counter() - t
    extra = {"calls": args["calls"]}
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": elapsed, "peak_rss": peak, **extra}))
"""


def child(mode: str, **args) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, json.dumps(args)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def save_model(path: str, params: dict) -> None:
    import torch

    from catena_mito.checkpoint import make_payload, save_checkpoint
    from catena_mito.models import build_model

    torch.manual_seed(0)
    model = build_model("monai_unet", **params).eval()
    save_checkpoint(path, make_payload("monai_unet", params, model, config={"patch_size": [PATCH] * 3}))


def write_noise(url: str, size: int, chunk: int = 64) -> None:
    """A uint8 noise volume written chunk slab by chunk slab (memory O(size² × chunk))."""
    from catena_mito import storage

    arr = storage.create_array(
        f"{url}/volumes/raw", (size,) * 3, np.uint8, (chunk,) * 3,
        attrs=storage.spatial_attrs((8, 8, 8)), overwrite=True,
    )
    rng = np.random.default_rng(0)
    for z in range(0, size, chunk):
        arr[z : z + chunk] = rng.integers(0, 256, (min(chunk, size - z), size, size), dtype=np.uint8)


def forward_calls(size: int, block: int, patch: int, stride: int, batch: int) -> tuple[int, int, int]:
    """(forward calls, windows, whole-volume windows) of predict with this geometry."""
    from catena_mito.blockwise.geometry import BlockGrid
    from catena_mito.inference import WindowGrid

    grid = WindowGrid((size,) * 3, (patch,) * 3, (stride,) * 3)
    calls = windows = 0
    for b in BlockGrid((size,) * 3, (block,) * 3).blocks():
        n = len(grid.windows(b.write_roi))
        windows += n
        calls += math.ceil(n / batch)
    return calls, windows, grid.num_windows


def output_files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` except the run records (``.catena``)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".catena" not in p.relative_to(root).parts}


def sharded_vs_single(work: Path, common: dict, ckpt: str, data: str, stride: int, block: int, shards: int) -> None:
    from catena_mito import storage
    from catena_mito.predict import run_store

    args = dict(common, ckpt=ckpt, data=data, stride=[stride] * 3, block=[block] * 3, chunks=[64] * 3, workers=1)
    single, sharded = work / "out4-single", work / "out4-sharded"
    t = time.perf_counter()
    child("predict", **args, out=str(single))
    one_s = time.perf_counter() - t
    t = time.perf_counter()
    for k in range(shards):
        child("predict", **args, out=str(sharded), shard=k, shards=shards)
    many_s = time.perf_counter() - t
    a, b = output_files(single), output_files(sharded)
    same = a == b
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    ids = []
    for out in (single, sharded):
        url = storage.join_url(str(out), Path(data).name, storage.prediction_path("mito"))
        store = run_store(url)
        claim = store.read_claim() or {}
        ids.append((claim.get("run_id"), store.read_complete(str(claim.get("run_id"))) is not None))
    print(f"\n4. sharded == single process ({Path(data).name}, tiny U-Net, block {block}³, stride {stride})")
    print(f"   1 process {one_s:.1f} s, {shards} shards {many_s:.1f} s (wall, with start-up)")
    print(f"   {len(a)} output files, identical: {same}" + ("" if same else f" (differ: {differ[:5]})"))
    print(f"   run ids {ids[0][0]} / {ids[1][0]}, complete {ids[0][1]} / {ids[1][1]}")
    if not same or ids[0][0] != ids[1][0] or not (ids[0][1] and ids[1][1]):
        raise SystemExit("sharded output differs from the single-process output")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--big", type=int, default=512)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternating predict/forward pairs")
    parser.add_argument("--shards", type=int, default=2, help="shards of figure 4 (0: skip it)")
    parser.add_argument("--keep", default=None, help="keep inputs/outputs in this directory")
    opts = parser.parse_args()

    work = Path(opts.keep or tempfile.mkdtemp(prefix="bench-predict-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        from catena_mito.synthetic import write_synthetic_dataset

        size, big, block, batch = opts.size, opts.big, opts.block, opts.batch
        stride = PATCH // 2
        t = time.perf_counter()
        syn = str(work / f"syn{size}.zarr")
        write_synthetic_dataset(syn, shape=(size,) * 3, seed=0, chunks=(64, 64, 64))
        small_ckpt, tiny_ckpt = str(work / "small.pth"), str(work / "tiny.pth")
        save_model(small_ckpt, SMALL_UNET)
        save_model(tiny_ckpt, TINY_UNET)
        print(f"setup: synthetic {size}³ + checkpoints in {time.perf_counter() - t:.1f} s", flush=True)

        # 1. overhead of predict over pure forward passes of the same windows
        common = {"threads": opts.threads, "batch": batch, "patch": [PATCH] * 3}
        calls, windows, whole = forward_calls(size, block, PATCH, stride, batch)
        # This machine's speed drifts by 2-3x between minutes (shared cores), so predict and
        # the forward loop run as alternating pairs and the median of the pair ratios counts.
        pairs = []
        for i in range(opts.repeats):
            pred = child("predict", **common, ckpt=small_ckpt, data=syn, out=str(work / f"out1-{i}"),
                         stride=[stride] * 3, block=[block] * 3, chunks=[64] * 3, workers=1)
            fwd = child("forward", **common, ckpt=small_ckpt, calls=calls)
            assert pred["windows_run"] == windows, (pred["windows_run"], windows)
            pairs.append((pred["seconds"], fwd["seconds"]))
        print(f"\n1. predict {size}³, small U-Net {SMALL_UNET['channels']}, patch {PATCH}³, stride "
              f"{stride}, block {block}³, batch {batch}, {opts.threads} CPU threads "
              f"({windows} windows, {calls} forward calls of batch {batch}; {opts.repeats} alternating pairs)")
        for p_s, f_s in pairs:
            print(f"   predict {p_s:7.1f} s   pure forward {f_s:7.1f} s   ratio {p_s / f_s:6.3f}")
        ratio = statistics.median(p_s / f_s for p_s, f_s in pairs)
        print(f"   median ratio      {ratio:8.3f}   (goal <= 1.10)")

        # 2. recompute cost of blocks (geometry only)
        print(f"\n2. windows computed / windows of one whole-volume pass ({size}³, patch {PATCH}, stride {stride})")
        for b in (64, 128, 256):
            _, n, w = forward_calls(size, b, PATCH, stride, batch)
            print(f"   block {b:3d}³: {n:6d} / {w:6d} = {n / w:.3f}")
        for b in (128, 256):
            _, n, w = forward_calls(big, b, PATCH, stride, batch)
            print(f"   ({big}³) block {b:3d}³: {n:6d} / {w:6d} = {n / w:.3f}")

        # 3. memory: peak RSS at big³ / size³, same block, tiny model, stride = patch
        rss = {}
        for s in (size, big):
            url = str(work / f"noise{s}.zarr")
            write_noise(url, s)
            rss[s] = child("predict", **common, ckpt=tiny_ckpt, data=url, out=str(work / f"out_rss{s}"),
                           stride=[PATCH] * 3, block=[block] * 3, chunks=[64] * 3, workers=1)
            shutil.rmtree(url, ignore_errors=True)
        print(f"\n3. peak RSS, tiny U-Net {TINY_UNET['channels']}, stride {PATCH} (= patch), block {block}³")
        for s in (size, big):
            print(f"   {s}³: {rss[s]['peak_rss'] / 2**20:8.1f} MiB  ({rss[s]['seconds']:.1f} s)")
        print(f"   ratio {big}³/{size}³: {rss[big]['peak_rss'] / rss[size]['peak_rss']:.3f}   (goal <= 1.1)")
        # 4. sharded == single process (tiny model: the geometry, not the model, is tested)
        if opts.shards > 1:
            sharded_vs_single(work, common, tiny_ckpt, syn, stride, block, opts.shards)

        print(f"\ntotal bench time {time.perf_counter() - started:.0f} s")
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
