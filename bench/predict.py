"""Benchmark ``catena-mito predict`` on CPU: windows once, overhead, pipeline throughput, memory.

Figures (issue 13):

1. windows computed by a 3-shard run with default settings / windows of one whole-volume
   pass, at 256³ and 512³, for patch 64 / stride 32 and patch 128 / stride 64 (goal
   <= 1.05), beside the same figure for ``window_sharing: recompute`` with the previous
   default 128³ blocks ("before"). From the run plan (``--dry-run``'s accounting, which the
   tests check against the windows predict really runs); no model runs.
2. wall time of predict (one shard, default settings, the default Catena-sized U-Net, batch
   2) / bare forward passes over the whole-volume window grid with the same model and
   batch size, on ``--vol`` (default 128×256×256): goal <= 1.15; with the wall time spent
   inside each piece of the median predict run (model, softmax, fixed-point sums, reading,
   pieces, blend, output encoding and writes; main thread and I/O thread apart).
3. pipeline throughput with a near-zero-cost model (one 1×1×1 conv, 2 channels) in output
   MVx/s, recompute (before) and exchange (after), and a profile of the exchange run
   (top functions by own time).
4. peak RSS of predict (exchange, near-zero-cost model) at 8× the volume / at 1×, 512³ / 256³
   (both with interior blocks of the default 128³; 256³ / 128³ printed beside): goal <= 1.1.
5. exchange vs recompute on the synthetic volume (small U-Net, float32 output): the two
   blends weight window borders differently (see catena_mito.exchange), so they differ by
   more than the fixed-point rounding, which the tests bound by 2^-24.
6. sharded == single process: 3 shards (default settings) vs one process, byte-identical
   output files and the same run id.

Each run of predict or of the bare model is a fresh subprocess that reports its own wall
time (work only, after imports) and peak RSS, with ``OMP_NUM_THREADS`` and torch's threads
both ``--threads``. This machine's cores are shared, so absolute times are noisy; ratios of
runs made back to back are the figures to read, and figure 2 prints the load average before
each pair. Under other load, libgomp's default spin-waiting makes a 2-thread model several
times slower (and either side of a pair by chance); ``OMP_WAIT_POLICY=PASSIVE`` in the
bench's environment (both children inherit it) keeps such runs comparable.

    .venv/bin/python bench/predict.py [--size 256] [--vol 128 256 256] [--repeats 1] [--skip 2,5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SMALL_UNET = {"channels": (8, 16, 32), "strides": (2, 2), "num_res_units": 1}

CHILD = r"""
import json, resource, sys, time
mode, args = sys.argv[1], json.loads(sys.argv[2])
import torch
torch.set_num_threads(args["threads"])
import monai.networks.nets  # noqa: F401  (imported before the clock in both modes)
from catena_mito.checkpoint import build_model_from_checkpoint, load_checkpoint
if args.get("conv1"):  # the near-zero-cost model: one 1x1x1 conv in place of the checkpoint's
    import catena_mito.checkpoint as ck
    def conv1(ckpt):
        torch.manual_seed(0)
        return torch.nn.Conv3d(1, 2, 1)
    ck.build_model_from_checkpoint = conv1
if mode == "predict":
    from catena_mito.config import PredictConfig, config_from_dict
    from catena_mito.predict import predict
    config = config_from_dict(PredictConfig, {"model_path": args["ckpt"], "test_zarr_dirs": [args["data"]],
                                              "output_dir": args["out"], "device": "cpu", **args["config"]})
    timers = {}
    if args.get("timers"):  # wall time inside the pieces of predict (figure 2's breakdown)
        import functools, threading
        import catena_mito.exchange as ex, catena_mito.inference as inf, catena_mito.predict as pr
        import catena_mito.preprocess as pp, zarr
        def timed(owner, name, label):
            f = getattr(owner, name)
            @functools.wraps(f)
            def g(*a, **k):
                t0 = time.perf_counter()
                try:
                    return f(*a, **k)
                finally:
                    key = label + ("" if threading.current_thread() is threading.main_thread() else " [io thread]")
                    timers[key] = timers.get(key, 0.0) + time.perf_counter() - t0
            setattr(owner, name, g)
        for owner, name, label in [
                (inf.ModelRunner, "_logits", "forward (model)"),
                (inf.ModelRunner, "_probabilities", "softmax/sigmoid"),
                (inf.ModelRunner, "accumulate", "accumulate (forward + softmax + fixed point)"),
                (pp.Preprocessor, "__call__", "read + preprocess"),
                (ex.PieceStore, "put", "pieces: encode + write"),
                (ex.PieceStore, "get", "pieces: read + decode"),
                (ex.Exchange, "blend", "blend (sum pieces, divide)"),
                (pr, "encode", "encode output dtype"),
                (zarr.Array, "__setitem__", "zarr write (encode + store)")]:
            timed(owner, name, label)
    prof = None
    if args.get("profile"):
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    t = time.perf_counter()
    summary = predict(config, shard_index=args.get("shard", 0), num_shards=args.get("shards", 1))
    elapsed = time.perf_counter() - t
    extra = {"windows_run": summary["outputs"][0]["windows_run"], "shape": summary["outputs"][0]["shape"],
             "timers": timers}
    if prof is not None:
        import io, pstats
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args["profile"])
        extra["profile"] = out.getvalue()
else:
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
    # OMP_NUM_THREADS too: predict sizes torch's threads to the CPUs unless it is set, and
    # both children must run the model with the same threads (``--threads``).
    env = {**os.environ, "OMP_NUM_THREADS": str(args.get("threads", 1))}
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, json.dumps(args)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def save_model(path: str, params: dict, patch: int, stride: int) -> None:
    import torch

    from catena_mito.checkpoint import make_payload, save_checkpoint
    from catena_mito.models import build_model

    torch.manual_seed(0)
    model = build_model("monai_unet", **params).eval()
    save_checkpoint(path, make_payload("monai_unet", params, model,
                                       config={"patch_size": [patch] * 3, "stride": [stride] * 3}))


def write_noise(url: str, shape, chunk: int = 64) -> None:
    """A uint8 noise volume written slab by slab (memory O(y·x·chunk))."""
    from catena_mito import storage

    arr = storage.create_array(f"{url}/volumes/raw", shape, np.uint8, (chunk,) * 3,
                               attrs=storage.spatial_attrs((8, 8, 8)), overwrite=True)
    rng = np.random.default_rng(0)
    for z in range(0, shape[0], chunk):
        arr[z : z + chunk] = rng.integers(0, 256, (min(chunk, shape[0] - z), *shape[1:]), dtype=np.uint8)


def empty_volume(url: str, shape) -> None:
    """A raw array with metadata only (no chunk written): enough for a plan."""
    from catena_mito import storage

    storage.create_array(f"{url}/volumes/raw", shape, np.uint8, (64, 64, 64),
                         attrs=storage.spatial_attrs((8, 8, 8)), overwrite=True)


def plan_windows(work: Path, size: int, patch: int, stride: int, shards: int, **config) -> tuple[int, int, list]:
    """(windows over all shards, whole-volume windows, block shape) from the plans of ``shards`` shards."""
    from catena_mito.config import PredictConfig, config_from_dict
    from catena_mito.predict import predict

    data = work / f"empty{size}.zarr"
    if not data.exists():
        empty_volume(str(data), (size,) * 3)
    ckpt = work / f"plan-{patch}.pth"
    if not ckpt.exists():
        save_model(str(ckpt), {"channels": (2, 4), "strides": (2,), "num_res_units": 0}, patch, stride)
    cfg = config_from_dict(PredictConfig, {"model_path": str(ckpt), "test_zarr_dirs": [str(data)],
                                           "output_dir": str(work / "plan-out"), "device": "cpu",
                                           "stride": [stride] * 3, **config})
    plans = [predict(cfg, shard_index=k, num_shards=shards, dry_run=True)["outputs"][0] for k in range(shards)]
    return sum(p["windows_this_shard"] for p in plans), plans[0]["windows_whole_volume"], plans[0]["block_shape"]


def figure_windows(work: Path, sizes) -> None:
    print("\n1. windows computed by 3 shards / windows of one whole-volume pass (plans; goal <= 1.05)")
    for patch, stride in ((64, 32), (128, 64)):
        for size in sizes:
            after, whole, block = plan_windows(work, size, patch, stride, 3)
            before, _, old = plan_windows(work, size, patch, stride, 3, window_sharing="recompute",
                                          block_shape=[128] * 3)
            print(f"   {size}³ patch {patch} stride {stride}: exchange (default block {block[0]}³) "
                  f"{after}/{whole} = {after / whole:.3f}   before: recompute, block {old[0]}³ "
                  f"{before}/{whole} = {before / whole:.3f}")


def figure_overhead(work: Path, vol, repeats: int, threads: int) -> None:
    from catena_mito.inference import WindowGrid
    from catena_mito.synthetic import write_synthetic_dataset

    data = str(work / "syn-overhead.zarr")
    write_synthetic_dataset(data, shape=tuple(vol), seed=0, chunks=(64, 64, 64))
    ckpt = str(work / "default-unet.pth")
    save_model(ckpt, {}, 64, 32)  # the default monai_unet (Catena-sized, 1.3 M parameters)
    batch = 2  # predict's default batch_size
    whole = WindowGrid(tuple(vol), (64,) * 3, (32,) * 3).num_windows
    calls = math.ceil(whole / batch)
    pairs = []
    loads = []
    for i in range(repeats):
        loads.append(os.getloadavg()[0])  # other work on the machine's cores skews a pair
        pred = child("predict", threads=threads, ckpt=ckpt, data=data, out=str(work / f"ovh{i}"), config={},
                     timers=True)
        fwd = child("forward", threads=threads, ckpt=ckpt, batch=batch, patch=[64] * 3, calls=calls)
        pairs.append((pred["seconds"], fwd["seconds"], pred["windows_run"], pred["timers"]))
        shutil.rmtree(work / f"ovh{i}", ignore_errors=True)
    print(f"\n2. predict (1 shard, defaults, default monai_unet, batch {batch}) / bare forward of the "
          f"whole-volume grid ({list(vol)}, {whole} windows, {calls} calls), {threads} threads")
    for (p_s, f_s, n, _), load in zip(pairs, loads):
        print(f"   predict {p_s:7.2f} s ({n} windows)   bare forward {f_s:7.2f} s   ratio {p_s / f_s:.3f}"
              f"   (load average before: {load:.1f})")
    ratios = sorted(p / f for p, f, _, _ in pairs)
    print(f"   median ratio {statistics.median(ratios):.3f}   (goal <= 1.15); ratio of the fastest runs "
          f"{min(p for p, *_ in pairs) / min(f for _, f, *_ in pairs):.3f}")
    p_s, f_s, _, timers = sorted(pairs, key=lambda r: r[0] / r[1])[len(pairs) // 2]
    print(f"   where the median predict run's {p_s:.2f} s went (wall time inside each piece; nested, and the "
          "io thread's overlap the main thread's):")
    for name, sec in sorted(timers.items(), key=lambda kv: -kv[1]):
        print(f"     {name:58s} {sec:6.3f} s")


def figure_throughput(work: Path, size: int, threads: int, profile_lines: int) -> None:
    data = str(work / f"noise{size}.zarr")
    write_noise(data, (size,) * 3)
    ckpt = str(work / "tiny-64.pth")
    save_model(ckpt, {"channels": (2, 4), "strides": (2,), "num_res_units": 0}, 64, 32)
    mvx = size**3 / 1e6
    runs = {}
    for name, config in (("before (recompute, block 128³)", {"window_sharing": "recompute", "block_shape": [128] * 3}),
                         ("after  (exchange, defaults)", {})):
        runs[name] = child("predict", threads=threads, ckpt=ckpt, data=data, out=str(work / f"thr-{len(runs)}"),
                           config=config, conv1=True, profile=profile_lines if name.startswith("after") else 0)
    print(f"\n3. pipeline throughput, near-zero-cost model (1x1x1 conv), {size}³ uint8, {threads} threads")
    for name, r in runs.items():
        print(f"   {name}: {r['seconds']:6.1f} s, {mvx / r['seconds']:6.2f} output MVx/s, {r['windows_run']} windows")
    prof = runs["after  (exchange, defaults)"]["profile"]
    print("   profile of the exchange run (own time; cProfile, so slower than unprofiled):")
    lines = prof.splitlines()
    start = next((i for i, ln in enumerate(lines) if "ncalls" in ln), 0)
    keep = [ln for ln in lines[start:] if ln.strip()]
    print("\n".join("     " + ln.replace(str(Path.cwd()) + "/", "") for ln in keep[: profile_lines + 1]))


def figure_memory(work: Path, size: int, threads: int) -> None:
    """Peak RSS at ``size``³ / at (``size``/2)³ (the figure), and (``size``/2)³ / (``size``/4)³ for
    the record: with the default 128³ blocks a 128³ volume is one block without halos, so
    its blocks are smaller than those of any larger volume (the same caveat as label's)."""
    ckpt = str(work / "tiny-64.pth")
    if not Path(ckpt).exists():
        save_model(ckpt, {"channels": (2, 4), "strides": (2,), "num_res_units": 0}, 64, 32)
    rss = {}
    for s in (size // 4, size // 2, size):
        url = str(work / f"rss{s}.zarr")
        write_noise(url, (s,) * 3)
        rss[s] = child("predict", threads=threads, ckpt=ckpt, data=url, out=str(work / f"rss-out{s}"), config={},
                       conv1=True)["peak_rss"]
        shutil.rmtree(url, ignore_errors=True)
        shutil.rmtree(work / f"rss-out{s}", ignore_errors=True)
    print("\n4. peak RSS, exchange defaults, near-zero-cost model: "
          + ", ".join(f"{s}³ {v / 2**20:.0f} MiB" for s, v in rss.items()))
    print(f"   {size}³ / {size // 2}³ (8x the volume) {rss[size] / rss[size // 2]:.3f}   (goal <= 1.1);   "
          f"{size // 2}³ / {size // 4}³ {rss[size // 2] / rss[size // 4]:.3f} (the smaller one block, no halo)")


def figure_blends(work: Path, threads: int) -> None:
    from catena_mito import storage
    from catena_mito.synthetic import write_synthetic_dataset

    data = str(work / "syn-blend.zarr")
    write_synthetic_dataset(data, shape=(64, 128, 128), seed=1, chunks=(64, 64, 64))
    ckpt = str(work / "small-64.pth")
    save_model(ckpt, SMALL_UNET, 64, 32)
    out = {}
    for mode in ("exchange", "recompute"):
        child("predict", threads=threads, ckpt=ckpt, data=data, out=str(work / f"blend-{mode}"),
              config={"window_sharing": mode, "output_dtype": "float32"})
        out[mode] = storage.open_array(str(work / f"blend-{mode}" / "syn-blend.zarr" / "volumes/predictions/mito"))[...]
    d = np.abs(out["exchange"] - out["recompute"])
    u8 = [np.rint(out[m] * np.float32(255)).astype(np.uint8) for m in ("exchange", "recompute")]
    print("\n5. exchange vs recompute blend (small U-Net, 64x128x128, float32): max |dp| "
          f"{d.max():.2e}, 99.9th pct {np.percentile(d, 99.9):.2e}, median {np.median(d):.2e}; "
          f"uint8 differs at {np.mean(u8[0] != u8[1]) * 100:.2f}% of voxels")


def output_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".catena" not in p.relative_to(root).parts}


def figure_sharded(work: Path, size: int, threads: int, shards: int) -> None:
    from catena_mito import storage
    from catena_mito.predict import run_store
    from catena_mito.synthetic import write_synthetic_dataset

    data = str(work / "syn-shard.zarr")
    write_synthetic_dataset(data, shape=(size,) * 3, seed=0, chunks=(64, 64, 64))
    ckpt = str(work / "tiny-64.pth")
    if not Path(ckpt).exists():
        save_model(ckpt, {"channels": (2, 4), "strides": (2,), "num_res_units": 0}, 64, 32)
    single, sharded = work / "shard-single", work / "shard-many"
    windows = [child("predict", threads=threads, ckpt=ckpt, data=data, out=str(single), config={})["windows_run"]]
    for k in range(shards):
        windows.append(child("predict", threads=threads, ckpt=ckpt, data=data, out=str(sharded), config={},
                             shard=k, shards=shards)["windows_run"])
    a, b = output_files(single), output_files(sharded)
    ids = []
    for out in (single, sharded):
        store = run_store(storage.join_url(str(out), "syn-shard.zarr", "volumes/predictions/mito"))
        claim = store.read_claim() or {}
        ids.append((claim.get("run_id"), store.read_complete(str(claim.get("run_id"))) is not None))
    print(f"\n6. sharded == single ({size}³, defaults): {len(a)} output files identical: {a == b}; run ids "
          f"{ids[0][0]} / {ids[1][0]}, complete {ids[0][1]}/{ids[1][1]}; windows 1 process {windows[0]}, "
          f"{shards} shards {sum(windows[1:])} ({windows[1:]})")
    if a != b or ids[0][0] != ids[1][0]:
        raise SystemExit("sharded output differs from the single-process output")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="edge of the throughput/sharding volumes")
    parser.add_argument("--memory-size", type=int, default=512, help="edge of the largest memory volume (figure 4)")
    parser.add_argument("--plan-sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--vol", type=int, nargs=3, default=[128, 256, 256], help="volume of figure 2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="predict/forward pairs of figure 2")
    parser.add_argument("--profile", type=int, default=12, help="profile lines of figure 3")
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated figure numbers to skip")
    parser.add_argument("--keep", default=None, help="keep inputs/outputs in this directory")
    opts = parser.parse_args()
    skip = {int(x) for x in opts.skip.split(",") if x}
    work = Path(opts.keep or tempfile.mkdtemp(prefix="bench-predict-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        steps = {
            1: lambda: figure_windows(work, opts.plan_sizes),
            2: lambda: figure_overhead(work, opts.vol, opts.repeats, opts.threads),
            3: lambda: figure_throughput(work, opts.size, opts.threads, opts.profile),
            4: lambda: figure_memory(work, opts.memory_size, opts.threads),
            5: lambda: figure_blends(work, opts.threads),
            6: lambda: figure_sharded(work, opts.size, opts.threads, opts.shards),
        }
        for number, step in steps.items():
            if number not in skip:
                step()
                sys.stdout.flush()
        print(f"\ntotal bench time {time.perf_counter() - started:.0f} s")
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
