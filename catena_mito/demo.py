"""``catena-mito demo``: the whole pipeline on synthetic data, end to end, in minutes.

It runs exactly what a user runs on real data, through the same library functions the
commands call: ``synth`` (a training and a held-out volume), ``train``, ``predict`` and
``label`` on the held-out volume, ``evaluate`` against its known mitochondria, and
``preview`` images. The model learns two targets, the foreground and each mitochondrion's
contour, and ``label`` uses its contour mode: seeds where the foreground is high and the
contour low, grown into the foreground, so touching mitochondria come out as separate
objects (pytorch_connectomics' MitoEM recipe). ``evaluate`` also scores the
connected-components mode of the same prediction, for comparison. Every output lands under one folder, with the configs it used, so a
user can rerun any step by hand (``catena-mito predict --config <out>/configs/predict.yaml``).

Sizes are chosen to finish in a few minutes on 2 CPU cores; a GPU makes it faster.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from catena_mito import storage

log = logging.getLogger(__name__)

#: Small backbones: three levels keep a CPU step in tens of milliseconds and still see
#: enough context to tell cristae-filled mitochondria from vesicles and glia. MONAI's
#: residual units (num_res_units 2, not Catena's plain 0): at three levels the plain
#: units are too shallow for the demo's budget (bench/train_quality.py, seed 0: held-out
#: IoU 0.70 with 0, 0.80 with 2).
DEMO_MODEL_PARAMS: dict[str, dict[str, Any]] = {
    "monai_unet": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 2},
    "rs_unet": {"channels": [8, 16, 32]},
}


@dataclass
class DemoSettings:
    """Sizes of the demo (voxels, z, y, x) and how long it trains."""

    out: str = "demo-out"
    train_shape: tuple[int, int, int] = (96, 128, 128)
    test_shape: tuple[int, int, int] = (64, 128, 128)
    resolution: tuple[float, float, float] = (8.0, 8.0, 8.0)
    #: hotstart switches to the lower rate after epoch 50; the last 10 epochs settle the
    #: weights and the batch-norm statistics (validation IoU swings without them).
    epochs: int = 60
    #: 80, not 40: at 2400 steps the two-target model's held-out IoU and contour F1 are
    #: still rising on every seed (bench/train_quality.py: mean IoU 0.852 -> 0.889,
    #: contour F1@0.5/0.75 0.771/0.614 -> 0.786/0.658 over seeds 0-2), for about a minute more.
    steps_per_epoch: int = 80
    seed: int = 0
    model_type: str = "monai_unet"
    #: What the model learns (catena_mito.targets) and how wide the contour is (voxels).
    targets: tuple[str, ...] = ("foreground", "contour")
    contour_width: int = 1

    @property
    def model_params(self) -> dict[str, Any]:
        return dict(DEMO_MODEL_PARAMS[self.model_type])


def _write_config(url: str, data: dict[str, Any]) -> str:
    storage.write_bytes(url, yaml.safe_dump(data, sort_keys=False).encode())
    return url


def train_config_data(settings: DemoSettings, train_url: str, test_url: str, runs_dir: str) -> dict[str, Any]:
    """The demo's training config (also what ``bench/train_quality.py`` trains)."""
    return {
        "exp_name": "demo",
        "runs_dir": runs_dir,
        "train_zarr_dirs": [train_url],
        "test_zarr_dirs": [test_url],
        "label_type": "mito",
        "model_type": settings.model_type,
        "model_params": settings.model_params,
        "patch_size": [32, 32, 32],
        "stride": [16, 16, 16],
        "batch_size": 2,
        "epochs": settings.epochs,
        "steps_per_epoch": settings.steps_per_epoch,
        "eval_interval": 20,
        "ckpt_interval": settings.epochs,
        "hotstart": True,
        "learning_rate": 3e-3,
        "learning_rate_after_hotstart_50": 3e-4,
        "loss_type": "DiceCE",
        "targets": list(settings.targets),
        **({"contour_width": settings.contour_width} if "contour" in settings.targets else {}),
        "rotation_augs": True,
        # Both synthetic volumes share one acquisition model; contrast augmentation is for
        # real data and would slow convergence within a few hundred steps.
        "contrast_augs": False,
        "seed": settings.seed,
    }


#: The demo's label settings: the contour mode's seeds and growth (voxels at 8 nm).
DEMO_LABEL: dict[str, Any] = {
    "thres_foreground": 0.5,
    "thres_small_instances": 50,
}
DEMO_CONTOUR_LABEL: dict[str, Any] = {
    "instance_mode": "contour",
    "thres_seed": 0.8,
    "thres_contour": 0.5,
    "thres_small_seeds": 32,
    "grow_distance": 8,
}


def label_settings(settings: DemoSettings) -> dict[str, Any]:
    """The LabelConfig fields that decide the demo's instances."""
    contour = "contour" in settings.targets
    return {**DEMO_LABEL, **(DEMO_CONTOUR_LABEL if contour else {"instance_mode": "connected_components"})}


def run_demo(settings: DemoSettings, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; returns a summary with metrics, timings and where every output is."""
    from catena_mito.config import (
        LabelConfig,
        PredictConfig,
        PyramidConfig,
        TrainConfig,
        load_config,
    )
    from catena_mito.evaluate import evaluate, format_report, write_report
    from catena_mito.label import label
    from catena_mito.predict import predict
    from catena_mito.preview import preview
    from catena_mito.pyramid import build_pyramid
    from catena_mito.synthetic import write_synthetic_dataset
    from catena_mito.targets import prediction_url
    from catena_mito.train import train

    out = settings.out.rstrip("/")
    train_url = storage.join_url(out, "data", "train.zarr")
    test_url = storage.join_url(out, "data", "test.zarr")
    configs = storage.join_url(out, "configs")
    timings: dict[str, float] = {}
    steps = ["synthesise", "train", "predict", "label", "evaluate", "preview"]

    def step(name: str) -> None:
        echo(f"[{steps.index(name) + 1}/{len(steps)}] {name}")

    t0 = time.perf_counter()
    step("synthesise")
    write_synthetic_dataset(train_url, shape=settings.train_shape, seed=settings.seed,
                            resolution=settings.resolution, chunks=(32, 64, 64), progress=True)
    write_synthetic_dataset(test_url, shape=settings.test_shape, seed=settings.seed + 1,
                            resolution=settings.resolution, chunks=(32, 64, 64), progress=True)
    timings["synthesise"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    step("train")
    train_cfg_url = _write_config(
        storage.join_url(configs, "train.yaml"),
        train_config_data(settings, train_url, test_url, storage.join_url(out, "runs")),
    )
    result = train(load_config(TrainConfig, train_cfg_url))
    timings["train"] = time.perf_counter() - t0
    checkpoint = storage.join_url(result.run_url, "best.pth")

    t0 = time.perf_counter()
    step("predict")
    predict_cfg_url = _write_config(storage.join_url(configs, "predict.yaml"), {
        "model_path": checkpoint,
        "test_zarr_dirs": [test_url],
        "block_shape": [64, 64, 64],
        "output_chunks": [32, 64, 64],
        "batch_size": 4,
        "pyramid_levels": 2,  # so viewers can zoom out (docs/viewing.md)
    })
    # The demo owns its output folder and retrains every time: its outputs are replaced,
    # never refused as another run's.
    predict(load_config(PredictConfig, predict_cfg_url), overwrite=True)
    timings["predict"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    step("label")
    label_cfg_url = _write_config(storage.join_url(configs, "label.yaml"), {
        "input_prediction_path": storage.join_url(test_url, storage.prediction_path("mito")),
        "output_instance_dir": storage.join_url(test_url, "volumes/labels"),
        "output_filename": "mito_instances",
        "chunk_size": [32, 64, 64],
        **label_settings(settings),
        "pyramid_levels": 2,
    })
    label(load_config(LabelConfig, label_cfg_url), overwrite=True)
    # raw and ground truth get the same levels as the outputs, for viewers
    build_pyramid(PyramidConfig(volumes=[storage.join_url(test_url, p) for p in (
        storage.RAW_PATH, *storage.LABEL_PATHS.values())], levels=2), overwrite=True)
    timings["label"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    step("evaluate")
    # The label output (contour mode) and, from the same prediction, every mode that can
    # run with the demo's settings, so the two methods are compared on one volume.
    modes_settings = {k: v for k, v in label_settings(settings).items() if k != "instance_mode"}
    report = evaluate(
        test_url, storage.join_url(test_url, storage.prediction_path("mito")),
        storage.join_url(test_url, storage.INSTANCES_PATH),
        instance_modes="auto", label_settings=modes_settings,
        # a 64 x 128 x 128 crop cuts many tubes at its faces: also show the scores
        # without the slivers that the size filter removes from any output
        min_gt_size=DEMO_LABEL["thres_small_instances"],
    )
    report_url = storage.join_url(out, "evaluation.json")
    write_report(report, report_url)
    timings["evaluate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    step("preview")
    pngs = preview(test_url, storage.join_url(out, "previews") + "/")
    timings["preview"] = time.perf_counter() - t0

    summary = {
        "report": report,
        "timings": timings,
        "outputs": {
            "training data": train_url,
            "test data": test_url,
            "run (checkpoints, metrics.jsonl, previews)": result.run_url,
            "probabilities": storage.join_url(test_url, storage.prediction_path("mito")),
            **({"contour probabilities": prediction_url(storage.join_url(test_url, storage.prediction_path("mito")), "contour")}
               if "contour" in settings.targets else {}),
            "instances": storage.join_url(test_url, storage.INSTANCES_PATH),
            "evaluation": report_url,
            "previews": pngs,
            "configs": configs,
        },
    }
    echo("")
    echo(format_report(report))
    echo("")
    echo(f"done in {sum(timings.values()):.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")")
    echo("outputs:")
    for name, where in summary["outputs"].items():
        if isinstance(where, list):
            echo(f"  {name}:")
            for item in where:
                echo(f"    {item}")
        else:
            echo(f"  {name}: {where}")
    echo(f"open them: catena-mito view {test_url} --serve 8000  (a neuroglancer link and the napari command);")
    echo(f"  rerun a step: catena-mito predict --config {storage.join_url(configs, 'predict.yaml')}")
    return summary
