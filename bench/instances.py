"""Benchmark the instance modes of ``catena-mito label`` (issue 12).

Three figures, one subcommand each:

``quality``  perfect inputs (foreground = the ground-truth mask, contour =
             ``targets.instance_contour(ids, width)``) on synthetic volumes of several
             seeds: instance F1 at IoU 0.5 and 0.75 of ``contour`` and of
             ``connected_components``, and an upper bound: how many ground-truth objects
             are one connected piece whose seed region (mask minus contour) is one piece
             too — no seeded method can find the others as one object. ``--noise`` and
             ``--blur`` degrade the perfect inputs (Gaussian blur, then additive noise,
             clipped to [0, 1]). The contour mode is scored against every ground-truth
             id, against the ids of at least ``thres_small_instances`` voxels (what any
             mode can output: the figure, goal F1@0.75 >= 0.98) and against the crop's
             26-connected pieces of at least that size (an object leaving the crop and
             coming back is two pieces). Then why each ground-truth object the contour
             mode misses at IoU 0.75 is missed (:data:`MISS_CAUSES`, the first that
             holds: under ``thres_small_instances``, several pieces in the crop, no seed
             voxel, only seeds under ``thres_small_seeds``, removed after growing,
             merged, split, short), how many of them touch a face of the volume, and their sizes;
             ``--list`` prints each. ``--unseeded 0`` turns ``unseeded_components`` off
             (quality and sweep).
``sweep``    mean F1 over seeds on degraded inputs, for a grid of ``thres_seed``,
             ``thres_contour`` and ``grow_distance`` (the tables in docs/tuning.md);
             ``--mode distance`` sweeps ``seed_distance`` and ``grow_distance`` instead
             (on the foreground only).
``speed``    label --phase all (one process, Zarr in and out, local disk) on the same
             512³ input in ``contour`` and ``connected_components`` mode (blocks of
             ``--block``), and one bare ``cc3d.connected_components`` call on the whole
             mask, each in a fresh subprocess, ``--repeats`` times, interleaved; the
             median wall and CPU seconds of each. Peak memory (VmHWM of the child) in
             contour mode at 512³ and 256³ (8× the voxels) with blocks of
             ``--memory-block`` (64: both volumes then have interior blocks, whose halo
             reads are the largest; with 128³ blocks every 256³ block touches the edge).
             Goals: time contour / CC <= 2.5, peak memory 8× / 1× <= 1.1.

``score`` scores a real prediction (after the demo model predicts a contour):
``--prediction URL`` (the foreground; the contour beside it) against ``--labels URL``.

    .venv/bin/python bench/instances.py quality [--seeds 0 1 2] [--size 128] [--noise 0 --blur 0] [--list]
    .venv/bin/python bench/instances.py sweep   [--seeds 0 1 2] [--size 96] [--noise 0.15 --blur 1]
    .venv/bin/python bench/instances.py sweep   --mode distance --blur 0 --noise 0
    .venv/bin/python bench/instances.py speed   [--size 512] [--small 256] [--block 128] [--memory-block 64]
                                                [--repeats 3] [--keep DIR]
    .venv/bin/python bench/instances.py score   --prediction URL --labels URL [--set key=value ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# --- inputs ---------------------------------------------------------------------------------


def perfect_inputs(ids: np.ndarray, width: int, blur: float, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and contour probabilities (float32) from ground-truth ``ids``, degraded."""
    from scipy import ndimage

    from catena_mito.targets import instance_contour

    rng = np.random.default_rng(1000 + seed)
    out = []
    for target in ((ids > 0), instance_contour(ids, width)):
        p = target.astype(np.float32)
        if blur > 0:
            p = ndimage.gaussian_filter(p, blur)
        if noise > 0:
            p = p + rng.normal(0, noise, p.shape).astype(np.float32)
        out.append(np.clip(p, 0, 1).astype(np.float32))
    return out[0], out[1]


def scores(gt: np.ndarray, pred: np.ndarray) -> dict:
    from catena_mito.instance_metrics import Contingency, instance_scores

    c = Contingency()
    c.update(gt, pred)
    s = instance_scores(c.tables())
    return {"n_gt": s["n_gt"], "n_pred": s["n_pred"],
            **{f"f1@{t}": s["thresholds"][t]["f1"] for t in ("0.5", "0.75")}}


def seedable(ids: np.ndarray, width: int) -> int:
    """Ground-truth objects that are one 26-connected piece with a one-piece interior."""
    import cc3d

    from catena_mito.targets import instance_contour

    interior = np.where(instance_contour(ids, width), 0, ids)
    n = 0
    for g in np.unique(ids)[1:]:
        m = ids == g
        if cc3d.connected_components(m, connectivity=26).max() == 1 and \
                cc3d.connected_components(interior == g, connectivity=26).max() == 1:
            n += 1
    return n


def settings(mode: str, **kw):
    from catena_mito.instances import InstanceSettings

    base = dict(thres_foreground=0.5, thres_small_instances=100, connectivity=26, thres_seed=0.8,
                thres_contour=0.3, thres_small_seeds=8, grow_distance=8,
                unseeded_components=True)  # LabelConfig's defaults
    base.update(kw)
    return InstanceSettings(mode=mode, **base)


def volume(size: int, seed: int) -> np.ndarray:
    from catena_mito.synthetic import make_volume

    return make_volume((size,) * 3, seed=seed)["mito_ids"]


# --- quality --------------------------------------------------------------------------------


def crop_pieces(ids: np.ndarray) -> np.ndarray:
    """``ids`` with each object split into its 26-connected pieces inside the volume: the
    objects as this crop shows them. An object that leaves the crop and comes back is two
    pieces here, which nothing inside the volume joins (an annotator of the crop alone
    would label them apart too)."""
    import cc3d

    return cc3d.connected_components(ids, connectivity=26).astype(np.uint32)


def without_small(ids: np.ndarray, min_size: int) -> np.ndarray:
    """``ids`` with the objects of fewer than ``min_size`` voxels removed (slivers cut by
    the crop's faces, which ``thres_small_instances`` removes from any output by design)."""
    sizes = np.bincount(ids.ravel())
    small = np.nonzero(sizes < min_size)[0]
    return np.where(np.isin(ids, small[small > 0]), 0, ids).astype(ids.dtype)



# --- why an object is missed ----------------------------------------------------------------

#: The causes of a miss, in the order they are tested (the first that holds is the cause).
MISS_CAUSES = (
    ("small", "the object has fewer than thres_small_instances voxels: removed from any output by design"),
    ("pieces", "the object is several 26-connected pieces inside the volume (joined outside the crop)"),
    ("no seed", "no seed voxel in the object (all of it is contour, or foreground not high enough)"),
    ("seed dropped", "seed voxels, but each seed piece under thres_small_seeds voxels"),
    ("removed", "a kept seed, but every grown object on it under thres_small_instances voxels"),
    ("merged", "the prediction that overlaps it most also covers another ground-truth object"),
    ("split", "several predictions cover it, none with IoU >= 0.75"),
    ("short", "one prediction alone, IoU < 0.75 (growth stopped short, or spilled into background)"),
)


def miss_breakdown(ids: np.ndarray, fg: np.ndarray, contour: np.ndarray, s, found: np.ndarray,
                   threshold: float = 0.75) -> list[dict]:
    """One row per ground-truth object that ``found`` misses at IoU ``threshold``: its id,
    size (voxels), whether it touches a face of the volume, its seed voxels and the cause
    (the first of :data:`MISS_CAUSES` that holds), in ground-truth id order."""
    from catena_mito.instance_metrics import Contingency, match_instances, pair_ious
    from catena_mito.instances.components import connected_components
    from catena_mito.instances.whole import number_by_first_voxel, seed_mask

    raw = seed_mask(fg, contour, s)
    kept = number_by_first_voxel(connected_components(raw, s.connectivity)[0], s.thres_small_seeds)
    c = Contingency()
    c.update(ids, found)
    t = c.tables()
    matched = set(match_instances(t, threshold)[0].tolist())
    ious = pair_ious(t)
    # pieces per ground-truth id: each 26-connected piece's id, counted
    piece_ids = crop_pieces(ids)
    piece_gt = np.zeros(int(piece_ids.max()) + 1, ids.dtype)
    piece_gt[piece_ids.ravel()] = ids.ravel()
    pieces = np.bincount(piece_gt[1:], minlength=int(ids.max()) + 1)
    face = np.zeros(int(ids.max()) + 1, bool)
    for a in range(3):
        for end in (0, -1):
            face[np.unique(np.take(ids, end, axis=a))] = True
    # per-object statistics in one pass each (bincount over the ground-truth ids)
    flat = ids.ravel()
    n = len(face)
    seed_voxels = np.bincount(flat, raw.ravel(), n).astype(np.int64)
    kept_voxels = np.bincount(flat, (kept.ravel() > 0), n).astype(np.int64)
    rows = []
    for g, size in zip(t["gt_ids"].tolist(), t["gt_sizes"].tolist()):
        if g in matched:
            continue
        on = t["pair_gt"] == g
        preds, inter = t["pair_pred"][on], t["pair_intersection"][on]
        if size < s.thres_small_instances:
            cause = "small"
        elif pieces[g] > 1:
            cause = "pieces"
        elif seed_voxels[g] == 0:
            cause = "no seed"
        elif kept_voxels[g] == 0:
            cause = "seed dropped"
        elif len(preds) == 0:
            cause = "removed"
        else:
            best = preds[np.argmax(inter)]
            others = np.unique(t["pair_gt"][(t["pair_pred"] == best) & (t["pair_gt"] != g)])
            cause = "merged" if len(others) else "split" if len(preds) > 1 else "short"
        rows.append({"id": int(g), "size": int(size), "face": bool(face[g]), "seed_voxels": int(seed_voxels[g]),
                     "labelled": round(float(inter.sum()) / size, 3),
                     "best_iou": round(float(ious[on].max()), 3) if on.any() else 0.0, "cause": cause})
    return rows


def cmd_quality(args) -> None:
    from catena_mito.instances import instances_whole_volume

    print(f"perfect inputs, {args.size}³ synthetic at 8 nm, contour width {args.width}, blur {args.blur}, "
          f"noise {args.noise}; thres_small_instances {args.min_size}")
    print(f"F1 against every ground-truth id; 'gt>=min': against the ids of at least {args.min_size} voxels "
          f"(the figure: the size filter removes smaller objects from every mode's output by design); "
          f"'pieces>=min': against the crop's 26-connected pieces of at least {args.min_size} voxels "
          f"(an object that leaves the crop and comes back is two pieces)")
    print("seed  gt  seedable | CC n F1@.5 F1@.75 | contour n F1@.5 F1@.75 | gt>=min F1@.75 | pieces>=min F1@.75")
    rows, misses = [], []
    for seed in args.seeds:
        ids = volume(args.size, seed)
        fg, contour = perfect_inputs(ids, args.width, args.blur, args.noise, seed)
        cc = scores(ids, instances_whole_volume(fg, None, settings("connected_components",
                                                                  thres_small_instances=args.min_size)))
        s = settings("contour", thres_small_instances=args.min_size, grow_distance=args.grow_distance,
                     thres_seed=args.thres_seed, thres_contour=args.thres_contour,
                     thres_small_seeds=args.small_seeds, unseeded_components=bool(args.unseeded))
        found = instances_whole_volume(fg, contour, s)
        ct = scores(ids, found)
        big = scores(without_small(ids, args.min_size), found)
        seen = scores(without_small(crop_pieces(ids), args.min_size), found)
        ok = seedable(ids, args.width)
        rows.append((cc, ct, big, seen))
        misses += [{"seed": seed, **m} for m in miss_breakdown(ids, fg, contour, s, found)]
        print(f"{seed:4d} {cc['n_gt']:4d} {ok:6d}   | {cc['n_pred']:4d} {cc['f1@0.5']:.3f} {cc['f1@0.75']:.3f} | "
              f"{ct['n_pred']:4d} {ct['f1@0.5']:.3f} {ct['f1@0.75']:.3f} | {big['n_gt']:4d}  {big['f1@0.75']:.3f}  | "
              f"{seen['n_gt']:4d}  {seen['f1@0.75']:.3f}")
    mean = lambda k, i: float(np.mean([r[i][k] for r in rows]))  # noqa: E731
    print(f"mean              | CC F1@.5 {mean('f1@0.5', 0):.3f} F1@.75 {mean('f1@0.75', 0):.3f} | "
          f"contour F1@.5 {mean('f1@0.5', 1):.3f} F1@.75 {mean('f1@0.75', 1):.3f} | "
          f"gt>=min F1@.75 {mean('f1@0.75', 2):.3f} (goal >= 0.98) | pieces>=min {mean('f1@0.75', 3):.3f}")
    n_gt = sum(r[1]["n_gt"] for r in rows)
    n_pred = sum(r[1]["n_pred"] for r in rows)
    tp = n_gt - len(misses)
    print(f"\ncontour mode, all seeds: {n_gt} ground-truth objects, {len(misses)} missed at IoU 0.75, "
          f"{n_pred - tp} predictions unmatched; the cause of each miss (the first that holds):")
    print("  cause         missed  on a face  sizes (voxels)   what it means")
    for cause, meaning in MISS_CAUSES:
        m = [r for r in misses if r["cause"] == cause]
        if not m:
            continue
        sizes = sorted(r["size"] for r in m)
        print(f"  {cause:13s} {len(m):6d} {sum(r['face'] for r in m):10d}  {sizes[0]:6d}-{sizes[-1]:<8d}  {meaning}")
    if args.list:
        for r in misses:
            print("  " + json.dumps(r))


def cmd_sweep(args) -> None:
    from catena_mito.instances import instances_whole_volume

    data = []
    for seed in args.seeds:
        ids = volume(args.size, seed)
        data.append((ids, *perfect_inputs(ids, args.width, args.blur, args.noise, seed)))
    print(f"mean F1@0.75 over seeds {args.seeds}, {args.size}³, contour width {args.width}, blur {args.blur}, "
          f"noise {args.noise}, thres_small_seeds {args.small_seeds}, thres_small_instances {args.min_size}")
    if args.mode == "distance":
        print("| seed_distance (nm) | grow_distance | F1@0.5 | F1@0.75 |")
        print("|---|---|---|---|")
        grid = [(None, None, t, d) for t, d in itertools.product(args.seed_distance, args.grow_distance)]
    else:
        print("| thres_seed | thres_contour | grow_distance | F1@0.5 | F1@0.75 |")
        print("|---|---|---|---|---|")
        grid = [(ts, tc, None, d) for ts, tc, d in
                itertools.product(args.thres_seed, args.thres_contour, args.grow_distance)]
    for ts, tc, sd, d in grid:
        f5, f75 = [], []
        for ids, fg, contour in data:
            kw = (dict(seed_distance=sd, resolution=(8.0, 8.0, 8.0)) if args.mode == "distance"
                  else dict(thres_seed=ts, thres_contour=tc))
            s = scores(ids, instances_whole_volume(fg, contour, settings(
                args.mode, grow_distance=d, thres_small_seeds=args.small_seeds,
                thres_small_instances=args.min_size, unseeded_components=bool(args.unseeded), **kw)))
            f5.append(s["f1@0.5"])
            f75.append(s["f1@0.75"])
        head = f"| {sd:g} | {d} |" if args.mode == "distance" else f"| {ts} | {tc} | {d} |"
        print(f"{head} {np.mean(f5):.3f} | {np.mean(f75):.3f} |", flush=True)


# --- speed ----------------------------------------------------------------------------------

CHILD = r"""
import json, resource, sys, time
import numpy as np
mode, inp, out, block = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
from catena_mito import storage
import catena_mito.label  # imports outside the timed part

if mode == "cc3d":
    import cc3d
    mask = storage.open_volume(inp)[...] > 0.5
    cpu0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    t = time.perf_counter()
    labels, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
    elapsed = time.perf_counter() - t
    objects = n
elif mode == "whole":
    # the least a one-process tool does end to end: read the whole prediction, one cc3d
    # call, the size filter, write the ids into an array chunked like label's output
    import cc3d, fastremap
    cpu0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    t = time.perf_counter()
    mask = storage.open_volume(inp)[...] > 0.5
    labels = cc3d.connected_components(mask, connectivity=26, out_dtype=np.uint32)
    del mask
    labels = cc3d.dust(labels, threshold=100, connectivity=26, in_place=True, precomputed_ccl=True)
    labels, _ = fastremap.renumber(labels, in_place=True)
    objects = int(labels.max())
    arr = storage.create_array(out + "/ids", labels.shape, np.uint32, (block,) * 3, overwrite=True)
    arr[...] = labels
    elapsed = time.perf_counter() - t
else:
    from catena_mito.config import LabelConfig
    from catena_mito.label import label
    config = LabelConfig(input_prediction_path=inp, output_instance_dir=out, chunk_size=block,
                         instance_mode=mode, connectivity=26)
    cpu0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    t = time.perf_counter()
    objects = label(config).num_objects
    elapsed = time.perf_counter() - t
usage = resource.getrusage(resource.RUSAGE_SELF)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child of a big parent
# would report the parent's peak
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": elapsed, "cpu_seconds": usage.ru_utime + usage.ru_stime - cpu0,
                  "peak_rss": peak, "objects": int(objects)}))
"""


def write_inputs(url: str, size: int, block: int, seed: int) -> None:
    """Synthetic ``mito_ids`` → foreground and contour arrays (perfect), chunk by chunk.

    The contour of a chunk is computed from the chunk read with a halo of one voxel, which
    equals the whole-volume contour (``instance_contour`` treats outside as the edge voxel).
    """
    from catena_mito import storage
    from catena_mito.synthetic import write_synthetic_dataset
    from catena_mito.targets import instance_contour

    write_synthetic_dataset(url, (size,) * 3, seed=seed, chunks=(block,) * 3)
    ids = storage.open_array(storage.join_url(url, "volumes/labels/mito_ids"))
    attrs = storage.spatial_attrs((8, 8, 8))
    fg = storage.create_array(storage.join_url(url, "volumes/predictions/mito"), (size,) * 3, np.float32,
                              (block,) * 3, overwrite=True, attrs=attrs)
    ct = storage.create_array(storage.join_url(url, "volumes/predictions/mito_contour"), (size,) * 3,
                              np.float32, (block,) * 3, overwrite=True, attrs=attrs)
    for z, y, x in itertools.product(range(0, size, block), repeat=3):
        lo = [max(0, c - 1) for c in (z, y, x)]
        hi = [min(size, c + block + 1) for c in (z, y, x)]
        part = ids[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        inner = tuple(slice(c - a, c - a + min(block, size - c)) for c, a in zip((z, y, x), lo))
        sl = tuple(slice(c, c + block) for c in (z, y, x))
        fg[sl] = (part[inner] > 0).astype(np.float32)
        ct[sl] = instance_contour(part)[inner].astype(np.float32)


def run_child(mode: str, inp: str, out: str, block: int) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, mode, inp, out, str(block)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def cmd_speed(args) -> None:
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="catena-bench-instances-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        inputs = {}
        for size in (args.size, args.small):
            url = str(tmp / f"synthetic{size}.zarr")
            if not (Path(url) / "volumes/predictions/mito_contour/zarr.json").exists():
                t = time.perf_counter()
                write_inputs(url, size, args.block, args.seed)
                print(f"wrote {size}³ inputs in {time.perf_counter() - t:.1f} s", flush=True)
            inputs[size] = url + "/volumes/predictions/mito"

        def once(mode: str, size: int, block: int, k: int) -> dict:
            out = tmp / f"out-{mode}-{size}-{block}-{k}.zarr"
            shutil.rmtree(out, ignore_errors=True)
            r = run_child(mode, inputs[size], str(out), block)
            shutil.rmtree(out, ignore_errors=True)
            print(f"  {mode} {size}³ blocks {block}³ run {k}: {r}", flush=True)
            return r

        def median(runs: list[dict]) -> dict:
            return {"seconds": float(np.median([r["seconds"] for r in runs])),
                    "cpu_seconds": float(np.median([r["cpu_seconds"] for r in runs])),
                    "peak_rss": max(r["peak_rss"] for r in runs), "objects": runs[0]["objects"]}

        timed = {"cc3d": [], "whole": [], "connected_components": [], "contour": []}
        for k in range(args.repeats):  # interleaved, so that a burst of other load hits all three
            for mode in timed:
                timed[mode].append(once(mode, args.size, args.block, k))
        bare, whole, cc, ct = (median(timed[m]) for m in ("cc3d", "whole", "connected_components", "contour"))
        memory = {size: median([once("contour", size, args.memory_block, k) for k in range(args.repeats)])
                  for size in (args.size, args.small)}
        mib = 2**20
        print(f"\n{args.size}³ float32 foreground + contour (perfect, synthetic seed {args.seed}), blocks "
              f"{args.block}³, 26-connectivity, median of {args.repeats} run(s); wall and CPU seconds "
              "(user + system, all threads: the work, less sensitive to other load than wall time)")
        print(f"  one bare cc3d call on the whole mask:  {bare['seconds']:.2f} s, CPU {bare['cpu_seconds']:.2f} s "
              f"({bare['objects']} components)")
        print(f"  read + one cc3d call + size filter + write, whole volume in memory:  {whole['seconds']:.2f} s, "
              f"CPU {whole['cpu_seconds']:.2f} s, peak {whole['peak_rss'] / mib:.0f} MiB ({whole['objects']} objects)")
        for name, r in (("connected_components", cc), ("contour", ct)):
            print(f"  label {name:24s}  {r['seconds']:.2f} s, CPU {r['cpu_seconds']:.2f} s, peak "
                  f"{r['peak_rss'] / mib:.0f} MiB, {r['objects']} objects")
        print(f"{'time contour / connected_components:':40s}wall {ct['seconds'] / cc['seconds']:.2f}, "
              f"CPU {ct['cpu_seconds'] / cc['cpu_seconds']:.2f}  (goal <= 2.5)")
        for name, r in (("contour", ct), ("connected_components", cc)):
            for base_name, base in (("bare cc3d", bare), ("read+cc3d+write", whole)):
                print(f"{'time ' + name + ' / ' + base_name + ':':52s}wall {r['seconds'] / base['seconds']:.1f}, "
                      f"CPU {r['cpu_seconds'] / base['cpu_seconds']:.1f}  (context)")
        big, small = memory[args.size], memory[args.small]
        print(f"contour, blocks {args.memory_block}³: {args.size}³ peak {big['peak_rss'] / mib:.0f} MiB "
              f"({big['seconds']:.2f} s), {args.small}³ peak {small['peak_rss'] / mib:.0f} MiB")
        print(f"peak memory contour {args.size}³ / {args.small}³ (blocks {args.memory_block}³):  "
              f"{big['peak_rss'] / small['peak_rss']:.2f}  (goal <= 1.1)")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


# --- a real prediction ----------------------------------------------------------------------


def cmd_score(args) -> None:
    """Label a prediction with a config (``--set`` overrides) and score it against labels."""
    from catena_mito import storage
    from catena_mito.config import LabelConfig, apply_overrides
    from catena_mito.label import label

    out = tempfile.mkdtemp(prefix="catena-bench-score-")
    try:
        data = apply_overrides({"input_prediction_path": args.prediction, "output_instance_dir": out}, args.set)
        config = LabelConfig(**data)
        summary = label(config)
        pred = storage.open_array(summary.output_url)[...]
        gt = storage.open_array(args.labels)[...]
        print(json.dumps({"settings": data, **scores(gt, pred)}))
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("quality", "sweep"):
        p = sub.add_parser(name)
        p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        p.add_argument("--size", type=int, default=128 if name == "quality" else 96)
        p.add_argument("--width", type=int, default=1, help="contour width (voxels)")
        p.add_argument("--blur", type=float, default=0.0 if name == "quality" else 1.0)
        p.add_argument("--noise", type=float, default=0.0 if name == "quality" else 0.15)
        p.add_argument("--min-size", type=int, default=100, help="thres_small_instances")
        p.add_argument("--small-seeds", type=int, default=8, help="thres_small_seeds")
        p.add_argument("--unseeded", type=int, choices=[0, 1], default=1,
                       help="unseeded_components (1, LabelConfig's default; 0: seedless components stay 0)")
        if name == "quality":
            p.add_argument("--list", action="store_true", help="print every missed object")
        multi = name == "sweep"
        p.add_argument("--thres-seed", type=float, nargs="+" if multi else None,
                       default=[0.7, 0.8, 0.9] if multi else 0.8)
        p.add_argument("--thres-contour", type=float, nargs="+" if multi else None,
                       default=[0.2, 0.3, 0.4, 0.5] if multi else 0.3)
        p.add_argument("--grow-distance", type=int, nargs="+" if multi else None,
                       default=[4, 8] if multi else 8)
        if multi:
            p.add_argument("--mode", choices=["contour", "distance"], default="contour")
            p.add_argument("--seed-distance", type=float, nargs="+", default=[24.0, 32.0, 40.0, 48.0],
                           help="distance mode (nm; the synthetic volumes are at 8 nm)")
    p = sub.add_parser("speed")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--small", type=int, default=256)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-block", type=int, default=64, help="blocks of the peak-memory runs")
    p.add_argument("--repeats", type=int, default=3, help="runs each (the median is reported)")
    p.add_argument("--keep", help="directory for the inputs (reused when present)")
    p = sub.add_parser("score")
    p.add_argument("--prediction", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    {"quality": cmd_quality, "sweep": cmd_sweep, "speed": cmd_speed, "score": cmd_score}[args.cmd](args)


if __name__ == "__main__":
    main()
