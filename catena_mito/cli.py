"""The ``catena-mito`` command line: parse flags, load the config, call one library function.

No logic lives here, and nothing heavy is imported at module level, so ``catena-mito
--help`` answers at once. Library errors (:class:`~catena_mito.errors.CatenaError`)
become one line on stderr and a non-zero exit: 2 for usage and configuration errors,
1 for runtime errors. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from catena_mito import __version__

_DEBUG = False


def _set_verbosity(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    """``--quiet``/``--verbose``, accepted before or after the command name."""
    if value:
        level = logging.WARNING if param.name == "quiet" else logging.DEBUG
        logging.getLogger().setLevel(level)
        logging.getLogger("catena_mito").setLevel(level)
    return value


def _log_options(func: Callable) -> Callable:
    func = click.option("--verbose", "-v", is_flag=True, expose_value=False, is_eager=True, callback=_set_verbosity,
                        help="Debug logging.")(func)
    return click.option("--quiet", "-q", is_flag=True, expose_value=False, is_eager=True, callback=_set_verbosity,
                        help="Warnings and errors only (no progress lines).")(func)


def _bars() -> bool:
    """Progress bars only in a terminal and when not ``--quiet``."""
    return sys.stderr.isatty() and logging.getLogger("catena_mito").isEnabledFor(logging.INFO)


def _config_options(func: Callable) -> Callable:
    func = click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE",
        help="Override a config field (YAML value; dotted keys for nested fields). Repeatable.",
    )(func)
    return click.option(
        "--config", "-c", "config_path", required=True, metavar="URL",
        help="YAML config (a local path or any fsspec URL, e.g. s3://bucket/job.yaml).",
    )(func)


def _shard_options(func: Callable) -> Callable:
    func = click.option(
        "--num-shards", type=int, default=None,
        help="Number of shards (default: $CATENA_NUM_SHARDS, else $SLURM_ARRAY_TASK_COUNT when the array is 0..N-1, else 1; required with a shard index from Slurm or Kubernetes).",
    )(func)
    func = click.option(
        "--shard-index", type=int, default=None,
        help="This process's shard (default: $JOB_COMPLETION_INDEX, else $SLURM_ARRAY_TASK_ID, else 0).",
    )(func)
    func = click.option(
        "--dry-run", is_flag=True,
        help="Print the plan (blocks, shards, windows, memory, output size, what the output holds now); write nothing.",
    )(func)
    return click.option(
        "--overwrite", is_flag=True,
        help="Recompute blocks already marked done; replace an output of another run (other model, settings, plan or input).",
    )(func)


def _allow_incomplete_option(func: Callable) -> Callable:
    return click.option(
        "--allow-incomplete", is_flag=True,
        help="Read an input written by catena-mito even if it is incomplete or stale (logged as a warning).",
    )(func)


def _load(cls_name: str, config_path: str, overrides: tuple[str, ...]) -> Any:
    from catena_mito import config

    return config.load_config(getattr(config, cls_name), config_path, overrides)


class _Group(click.Group):
    """Lists commands in the order they were added (the order a user meets them)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="catena-mito")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@_log_options
def cli(debug: bool) -> None:
    """Mitochondria segmentation for 3D EM volumes (FIB-SEM first).

    Every command reads a YAML config in which each path is an fsspec URL (local path,
    s3://, memory://). Axis order is (z, y, x); resolutions are in nm.
    """
    global _DEBUG
    _DEBUG = debug
    if debug:
        logging.getLogger().setLevel(logging.DEBUG)
    for noisy in ("botocore", "s3fs", "aiobotocore", "fsspec", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@cli.command()
@_log_options
@click.argument("out", metavar="OUT_URL")
@click.option("--shape", nargs=3, type=click.IntRange(min=1), default=(128, 128, 128), show_default=True, help="Volume shape Z Y X (voxels).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed: the same seed gives the same volume.")
@click.option("--resolution", nargs=3, type=float, default=(8.0, 8.0, 8.0), show_default=True, help="Voxel size Z Y X (nm).")
@click.option("--chunks", nargs=3, type=click.IntRange(min=1), default=(64, 64, 64), show_default=True, help="Zarr chunk shape Z Y X.")
def synth(out: str, shape: tuple[int, int, int], seed: int, resolution: tuple[float, float, float], chunks: tuple[int, int, int]) -> None:
    """Write a synthetic FIB-SEM-like dataset with known mitochondria to OUT_URL (a Zarr group)."""
    from catena_mito.synthetic import write_synthetic_dataset

    write_synthetic_dataset(out, shape=shape, seed=seed, resolution=resolution, chunks=chunks, progress=_bars())
    click.echo(f"wrote {out} (volumes/raw, volumes/labels/mito_ids, volumes/labels/neuron_ids)")


@cli.command()
@_log_options
@_config_options
def train(config_path: str, overrides: tuple[str, ...]) -> None:
    """Train a semantic mitochondria model (MONAI U-Net or RS-UNet).

    Multi-GPU: torchrun --nproc_per_node=K -m catena_mito train --config CFG.
    """
    config = _load("TrainConfig", config_path, overrides)
    from catena_mito.train import train as run

    run(config)


@cli.command()
@_log_options
@_config_options
@_shard_options
@click.option(
    "--phase", type=click.Choice(["all", "windows", "blend"]), default="all", show_default=True,
    help="window_sharing exchange: each block's windows and blend in one pass over this shard (all), or one of the two phases.",
)
@click.option(
    "--wait-timeout", type=float, default=600.0, show_default=True, metavar="SECONDS",
    help="How long a blend waits for the windows of lower shards (all: then computes them itself; blend: then fails).",
)
def predict(config_path: str, overrides: tuple[str, ...], shard_index: int | None, num_shards: int | None, overwrite: bool, dry_run: bool, phase: str, wait_timeout: float) -> None:
    """Sliding-window inference, block by block, writing a probability volume."""
    from catena_mito.blockwise.sharding import resolve_shard

    config = _load("PredictConfig", config_path, overrides)
    index, count = resolve_shard(shard_index, num_shards)
    from catena_mito.predict import format_plan
    from catena_mito.predict import predict as run

    summary = run(config, shard_index=index, num_shards=count, overwrite=overwrite, dry_run=dry_run,
                  phase=phase, wait_timeout=wait_timeout)
    if dry_run:
        click.echo("\n".join(format_plan(p) for p in summary["outputs"]))


@cli.command()
@_log_options
@_config_options
@_shard_options
@click.option(
    "--phase", type=click.Choice(["all", "blocks", "merge", "grow", "sizes", "relabel", "clean"]), default="all", show_default=True,
    help="Run one phase (blocks, grow and relabel are sharded; merge, sizes and clean are one process) "
    "or all of them. grow and sizes belong to the contour and distance instance modes; in "
    "connected_components mode they succeed doing nothing, so one set of Jobs runs every mode.",
)
@click.option(
    "--wait-timeout", type=float, default=0.0, show_default=True, metavar="SECONDS",
    help="merge, grow, sizes, relabel, clean: wait up to this long for the previous phase to complete "
    "(for Jobs started together).",
)
@_allow_incomplete_option
def label(config_path: str, overrides: tuple[str, ...], shard_index: int | None, num_shards: int | None, overwrite: bool, dry_run: bool, phase: str, wait_timeout: float, allow_incomplete: bool) -> None:
    """Threshold, connected components and small-instance removal, stitched into global ids."""
    from catena_mito.blockwise.sharding import resolve_shard

    config = _load("LabelConfig", config_path, overrides)
    # merge and clean are one process: a shard count from the environment is moot there
    index, count = (0, 1) if phase in ("merge", "sizes", "clean") else resolve_shard(shard_index, num_shards)
    from catena_mito.label import format_plan
    from catena_mito.label import label as run

    summary = run(config, phase=phase, shard_index=index, num_shards=count, overwrite=overwrite,
                  wait_timeout=wait_timeout, allow_incomplete=allow_incomplete, dry_run=dry_run)
    if dry_run:
        click.echo(format_plan(summary.plan))


@cli.command()
@_log_options
@click.option("--gt", "gt", required=True, metavar="URL", help="Ground truth: a dataset (uses volumes/labels/mito_ids) or an instance-id array.")
@click.option("--prediction", metavar="ARRAY_URL", default=None, help="Probabilities (uint8 = value/255, or float); default: the dataset's volumes/predictions/mito.")
@click.option("--instances", metavar="ARRAY_URL", default=None, help="Instance ids from label; default: the dataset's volumes/labels/mito_instances.")
@click.option("--threshold", type=float, default=0.5, show_default=True, help="Foreground where probability > this.")
@click.option("--iou", "iou_thresholds", type=float, multiple=True, default=(0.5, 0.75), show_default=True, help="IoU thresholds for instance matching. Repeatable.")
@click.option("--json", "json_url", metavar="OUT_URL", default=None, help="Also write the scores as JSON here (any fsspec URL).")
@click.option("--block-shape", nargs=3, type=int, default=None, help="Block read at a time, Z Y X voxels (default ~128^3 in whole chunks).")
@click.option("--instance-modes", "instance_modes", type=click.Choice(["auto", "connected_components", "contour"]), multiple=True, help="Also make instances from the prediction in these label modes (auto: every mode that can run; contour needs <prediction>_contour) and score each; the whole volume in memory. Repeatable.")
@click.option("--label-config", "label_config", metavar="YAML", default=None, help="With --instance-modes: take the instance settings (thresholds, sizes, growth) from this label config; default: label's defaults.")
@click.option("--min-gt-size", "min_gt_size", type=int, default=0, show_default=True, metavar="VOXELS", help="Also score the instances without the ground-truth objects under this many voxels (slivers cut by a crop's faces; predictions lying mostly on them are left out too); the main scores count every object.")
@_allow_incomplete_option
def evaluate(gt: str, prediction: str | None, instances: str | None, threshold: float, iou_thresholds: tuple[float, ...], json_url: str | None, block_shape: tuple[int, int, int] | None, instance_modes: tuple[str, ...], label_config: str | None, min_gt_size: int, allow_incomplete: bool) -> None:
    """Score probabilities (Dice/IoU) and instances (precision, recall, F1, AP) against ground truth.

    Reads block by block, so volumes of any size fit (--instance-modes excepted). AP at IoU t is TP / (TP + FP + FN)
    with optimal one-to-one matching (StarDist/Cellpose convention, exact at any t in (0, 1]);
    mean AP averages t = 0.50:0.05:0.95. Also the MitoEM challenge's AP-75 and COCO's mAP
    (predictions ranked by size).
    """
    from catena_mito.evaluate import evaluate as run
    from catena_mito.evaluate import format_report, instance_settings_of, write_report

    settings = instance_settings_of(_load("LabelConfig", label_config, ())) if label_config else None
    modes = "auto" if "auto" in instance_modes else list(instance_modes)
    report = run(gt, prediction, instances, threshold=threshold, iou_thresholds=iou_thresholds, block_shape=block_shape, progress=_bars(), allow_incomplete=allow_incomplete, instance_modes=modes or None, label_settings=settings, min_gt_size=min_gt_size)
    click.echo(format_report(report))
    if json_url:
        write_report(report, json_url)
        click.echo(f"wrote {json_url}")


@cli.command()
@_log_options
@click.argument("url", metavar="URL")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
def status(url: str, as_json: bool) -> None:
    """Which run produced an output (or each output of a dataset), from which inputs and
    settings; blocks done / total per phase, shards that still owe blocks, last block time."""
    import json

    from catena_mito.status import format_status
    from catena_mito.status import status as run

    entries = run(url)
    click.echo(json.dumps(entries, indent=1) if as_json else format_status(entries))


@cli.command()
@_log_options
@click.argument("volumes", metavar="VOLUME_URL", nargs=-1)
@click.option("--config", "-c", "config_path", default=None, metavar="URL", help="YAML PyramidConfig (volumes, levels, method, block_shape, storage_options); flags override it.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field (YAML value). Repeatable.")
@click.option("--levels", type=int, default=None, help="Coarser levels to build after level 0 (each halves the finest axes).")
@click.option("--method", type=click.Choice(["auto", "mean", "mode"]), default=None, help="Reduction (default auto: mode for label images, mean otherwise).")
@click.option("--level", type=int, default=None, help="Build only this level (1-based), e.g. one array job per level; default: every level, in order.")
@click.option("--wait-timeout", type=float, default=0.0, show_default=True, metavar="SECONDS", help="Wait up to this long for other shards' blocks of the level being read.")
@_shard_options
@_allow_incomplete_option
def pyramid(volumes: tuple[str, ...], config_path: str | None, overrides: tuple[str, ...], levels: int | None, method: str | None, level: int | None, wait_timeout: float, shard_index: int | None, num_shards: int | None, overwrite: bool, dry_run: bool, allow_incomplete: bool) -> None:
    """Build OME-NGFF multiscale levels of volumes (e.g. DATASET/volumes/raw), block-wise and shardable."""
    import json

    from catena_mito.blockwise.sharding import resolve_shard

    flags = [f"volumes={json.dumps(list(volumes))}"] if volumes else []
    flags += [f"levels={levels}"] if levels is not None else []
    flags += [f"method={method}"] if method is not None else []
    config = _load("PyramidConfig", config_path, (*overrides, *flags))
    index, count = resolve_shard(shard_index, num_shards)
    from catena_mito.pyramid import build_pyramid, plan_text

    if dry_run:
        click.echo(plan_text(config))
        return
    for s in build_pyramid(config, shard_index=index, num_shards=count, overwrite=overwrite, wait_timeout=wait_timeout,
                           allow_incomplete=allow_incomplete, level=level):
        click.echo(f"{s['volume']}: {'complete' if s['complete'] else 'incomplete'}, {len(s['shapes']) - 1} levels "
                   f"{s['shapes'][1:]} ({s['method']}), {s['blocks_computed']} blocks computed, {s['blocks_skipped']} skipped")


@cli.command()
@_log_options
@click.argument("dataset", metavar="DATASET_URL")
@click.option("--serve", type=int, default=None, metavar="PORT", help="Serve a local dataset's folder over HTTP (with CORS, on 127.0.0.1:PORT) until Ctrl-C; the link points there.")
@click.option("--port", type=int, default=8000, show_default=True, help="Without --serve: the port of the local HTTP server the link points at.")
@click.option("--json", "as_json", is_flag=True, help="Print only the neuroglancer state JSON.")
def view(dataset: str, serve: int | None, port: int, as_json: bool) -> None:
    """Print a neuroglancer link (raw, probabilities, instances at every level) and the napari command line."""
    import json

    from catena_mito import view as v

    port = serve if serve is not None else port

    if as_json:
        click.echo(json.dumps(v.neuroglancer_state(dataset, port=port), indent=1))
    else:
        click.echo(v.view_text(dataset, port=port))
    if serve is not None:
        server = v.make_server(dataset, port)
        click.echo(f"serving {server.server_address[0]}:{server.server_address[1]} (Ctrl-C stops)", err=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()


@cli.command("import")
@_log_options
@click.argument("source", metavar="SOURCE")
@click.option("--to", "to", required=True, metavar="DATASET_URL", help="Zarr dataset (group) to write into; created if missing.")
@click.option("--as", "as_", type=click.Choice(["raw", "mito_ids", "neuron_ids", "mito_instances"]), default="raw", show_default=True, help="What the volume is; sets its layout path (volumes/raw, volumes/labels/...).")
@click.option("--resolution", nargs=3, type=float, default=None, help="Voxel size Z Y X (nm); default: from the source metadata (required if it has none).")
@click.option("--offset", nargs=3, type=float, default=None, help="Offset Z Y X (nm); default: from the source metadata, else 0.")
@click.option("--chunks", nargs=3, type=int, default=(64, 64, 64), show_default=True, help="Zarr chunk shape Z Y X; the copy goes in slabs of Z slices.")
@click.option("--zarr-format", type=click.Choice(["2", "3"]), default=None, help="Format of a new dataset (default 3; an existing one keeps its own).")
@click.option("--overwrite", is_flag=True, help="Replace an existing, incompatible array.")
def import_cmd(source: str, to: str, as_: str, resolution: tuple[float, float, float] | None, offset: tuple[float, float, float] | None, chunks: tuple[int, int, int], zarr_format: str | None, overwrite: bool) -> None:
    """Copy a TIFF folder/stack, an HDF5 dataset (FILE.h5:/path) or a .npy into a dataset, block by block."""
    from catena_mito.convert import import_volume

    url = import_volume(source, to, as_, resolution=resolution, offset=offset, chunks=chunks, overwrite=overwrite, zarr_format=int(zarr_format) if zarr_format else None, progress=_bars())
    click.echo(f"wrote {url}")


@cli.command()
@_log_options
@click.argument("array", metavar="ARRAY_URL")
@click.argument("out", metavar="OUT_TIFF_URL")
@click.option("--max-gib", type=float, default=None, help="Refuse volumes above this size (default: a quarter of the free memory).")
@click.option("--ids", type=click.Choice(["uint16", "float32"]), default="uint16", show_default=True,
              help="Integers beyond 16 bits (instance ids): uint16 refuses them, float32 writes them exactly up to 2^24. Ids are never renumbered.")
def export(array: str, out: str, max_gib: float | None, ids: str) -> None:
    """Write a Zarr array as a Fiji-ready ImageJ TIFF hyperstack with its voxel size, unit and origin (the volume must fit in memory)."""
    from catena_mito.convert import export_tiff

    export_tiff(array, out, max_bytes=int(max_gib * 2**30) if max_gib is not None else None, ids=ids)
    click.echo(f"wrote {out}")


@cli.command("export-model")
@_log_options
@click.argument("checkpoint", metavar="CKPT_URL")
@click.argument("out", metavar="OUT_URL")
@click.option("--onnx", is_flag=True, help="Also write model.onnx (needs the onnx package; checked with onnxruntime when installed).")
@click.option("--overwrite", is_flag=True, help="Replace an export already in OUT_URL.")
def export_model(checkpoint: str, out: str, onnx: bool, overwrite: bool) -> None:
    """Write a checkpoint as TorchScript (model.pt, which predict takes as model_path), optionally
    ONNX, and a model card (model_card.json, README.md) into the folder OUT_URL."""
    from catena_mito.model_export import export_model as run

    card = run(checkpoint, out, onnx=onnx, overwrite=overwrite)
    check = card["verification"]
    click.echo(f"wrote {', '.join(card['files'])} to {out} (max |probability difference| vs the checkpoint: "
               f"TorchScript {check['torchscript']:.3g}" + (f", ONNX {check['onnx']:.3g}" if check.get("onnx") is not None else "") + ")")


@cli.command()
@_log_options
@click.argument("dataset", metavar="DATASET_URL", required=False)
@click.option("--out", "out", required=True, metavar="URL_PREFIX", help="Prefix of the PNG names (a folder ending in / or any prefix; any fsspec URL).")
@click.option("--z", "z", type=int, multiple=True, help="Slice index to draw (voxels). Repeatable; default: the middle slice.")
@click.option("--raw", metavar="ARRAY_URL", default=None, help="Raw array (default: the dataset's volumes/raw).")
@click.option("--prediction", metavar="ARRAY_URL", default=None, help="Probabilities (default: the dataset's volumes/predictions/mito).")
@click.option("--instances", metavar="ARRAY_URL", default=None, help="Instance ids (default: the dataset's volumes/labels/mito_instances).")
@click.option("--no-ortho", is_flag=True, help="Skip the yz and xz planes through the centre.")
@_allow_incomplete_option
def preview(dataset: str | None, out: str, z: tuple[int, ...], raw: str | None, prediction: str | None, instances: str | None, no_ortho: bool, allow_incomplete: bool) -> None:
    """Write PNGs of raw, probabilities and outlined instances for z slices and the yz/xz centre planes."""
    from catena_mito.preview import preview as run

    for url in run(dataset, out, raw=raw, prediction=prediction, instances=instances, z=z, orthogonal=not no_ortho, allow_incomplete=allow_incomplete):
        click.echo(f"wrote {url}")


def _unraisable(unraisable: Any) -> None:
    """Keep stderr to the one error line: after a failed S3 call, s3fs/aiobotocore coroutines
    that zarr started alongside it are closed at garbage collection and Python would print
    their "Exception ignored" tracebacks. ``--debug`` shows them."""
    if _DEBUG:
        sys.__unraisablehook__(unraisable)
    else:
        logging.getLogger("catena_mito").debug("ignored: %s: %r", unraisable.err_msg, unraisable.exc_value)


@cli.command()
@_log_options
@click.option("--out", default="demo-out", show_default=True, metavar="URL", help="Where every output goes (any fsspec URL).")
@click.option("--epochs", type=int, default=60, show_default=True, help="Training epochs (80 steps each; the rate drops tenfold after epoch 50).")
@click.option("--model-type", type=click.Choice(["monai_unet", "rs_unet"]), default="monai_unet", show_default=True, help="Backbone (rs_unet is about 3x slower per step on a CPU).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data and the training.")
def demo(out: str, epochs: int, model_type: str, seed: int) -> None:
    """Run the whole pipeline on synthetic data: synth, train, predict, label, evaluate, preview."""
    from catena_mito.demo import DemoSettings, run_demo

    run_demo(DemoSettings(out=out, epochs=epochs, model_type=model_type, seed=seed), echo=click.echo)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning library errors into one line and an exit code."""
    from catena_mito.blockwise import signals
    from catena_mito.errors import CatenaError, Stopped

    sys.unraisablehook = _unraisable
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    signals.install()
    try:
        cli.main(args=argv, prog_name="catena-mito", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("catena-mito: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except CatenaError as e:
        if _DEBUG:
            raise
        click.echo(f"catena-mito: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("catena-mito: interrupted", err=True)
        sys.exit(130)
    except Stopped as e:
        click.echo(f"catena-mito: {e}", err=True)
        sys.exit(Stopped.exit_code)
    except Exception as e:
        if _DEBUG:
            raise
        click.echo(
            f"catena-mito: unexpected error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
            err=True,
        )
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
