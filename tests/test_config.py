"""Strict configs: unknown keys, validation, overrides, redaction, loading errors."""

from __future__ import annotations

import pytest
import yaml

from catena_mito.config import (
    REDACTED,
    LabelConfig,
    PredictConfig,
    TrainConfig,
    field_docs,
    load_config,
    save_resolved_config,
)
from catena_mito.errors import ConfigError

TRAIN = {"train_zarr_dirs": ["data/a.zarr"]}
PREDICT = {"model_path": "runs/x/best.pth", "test_zarr_dirs": ["data/a.zarr"]}
LABEL = {"input_prediction_path": "a.zarr/volumes/predictions/mito", "output_instance_dir": "a.zarr/volumes/labels"}


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def test_defaults_are_complete(tmp_path):
    cfg = load_config(TrainConfig, write(tmp_path, TRAIN))
    assert cfg.patch_size == (64, 64, 64) and cfg.stride == (32, 32, 32)
    assert cfg.model_type == "monai_unet" and cfg.label_type == "mito" and cfg.runs_dir == "runs"
    assert load_config(LabelConfig, write(tmp_path, LABEL)).connectivity == 26
    assert load_config(PredictConfig, write(tmp_path, PREDICT)).output_dtype == "uint8"


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'pach_size'.*did you mean 'patch_size'"):
        load_config(TrainConfig, write(tmp_path, {**TRAIN, "pach_size": [8, 8, 8]}))
    with pytest.raises(ConfigError, match=r"unknown key 'zzz'.*valid keys"):
        load_config(LabelConfig, write(tmp_path, {**LABEL, "zzz": 1}))


@pytest.mark.parametrize(
    "cls,base,update,match",
    [
        (TrainConfig, TRAIN, {"patch_size": [64, 64]}, "patch_size.*3 values"),
        (TrainConfig, TRAIN, {"patch_size": [64, 0, 64]}, "patch_size"),
        (TrainConfig, TRAIN, {"patch_size": "big"}, "patch_size"),
        (TrainConfig, TRAIN, {"stride": [65, 8, 8]}, r"stride \[65, 8, 8\] must be <= patch_size"),
        (TrainConfig, TRAIN, {"label_type": "mitto"}, "label_type.*'mito' or 'neuron'.*mitto"),
        (TrainConfig, TRAIN, {"model_type": "unet"}, "model_type"),
        (TrainConfig, TRAIN, {"epochs": 0}, "epochs"),
        (TrainConfig, TRAIN, {"loss_type": "BCE"}, "loss_type"),
        (TrainConfig, {}, {}, "train_zarr_dirs.*required"),
        (LabelConfig, LABEL, {"thres_foreground": 1.5}, "thres_foreground"),
        (LabelConfig, LABEL, {"chunk_size": [64, -1, 64]}, "chunk_size"),
        (LabelConfig, LABEL, {"connectivity": 8}, "connectivity"),
        (LabelConfig, LABEL, {"output_format": "png"}, "output_format.*'zarr' or 'tiff'"),
        (PredictConfig, PREDICT, {"block_shape": [100, 128, 128]}, "not a multiple of the output chunk"),
        (PredictConfig, PREDICT, {"output_dtype": "int8"}, "output_dtype"),
    ],
)
def test_invalid_values_name_the_field(tmp_path, cls, base, update, match):
    with pytest.raises(ConfigError, match=match):
        load_config(cls, write(tmp_path, {**base, **update}))


def test_scalar_broadcasts_to_three_axes(tmp_path):
    cfg = load_config(TrainConfig, write(tmp_path, {**TRAIN, "patch_size": 32, "stride": 16}))
    assert cfg.patch_size == (32, 32, 32) and cfg.stride == (16, 16, 16)


def test_overrides_are_yaml_typed_and_dotted(tmp_path):
    cfg = load_config(
        TrainConfig,
        write(tmp_path, {**TRAIN, "model_params": {"dropout": 0.2}}),
        ["epochs=3", "patch_size=[32, 32, 32]", "stride=16", "model_params.channels=[8, 16]",
         "storage_options.endpoint_url=http://127.0.0.1:9000", "clahe=true", "exp_name=run 1"],
    )
    assert cfg.epochs == 3 and cfg.patch_size == (32, 32, 32) and cfg.clahe is True
    assert cfg.model_params == {"dropout": 0.2, "channels": [8, 16]}
    assert cfg.storage_options["endpoint_url"] == "http://127.0.0.1:9000"
    assert cfg.exp_name == "run 1"
    with pytest.raises(ConfigError, match="epoch.*did you mean 'epochs'"):
        load_config(TrainConfig, write(tmp_path, TRAIN), ["epoch=3"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(TrainConfig, write(tmp_path, TRAIN), ["epochs"])
    # overrides alone are a complete config
    assert load_config(LabelConfig, None, [f"{k}={v}" for k, v in LABEL.items()]).output_filename == "mito_instances"


@pytest.mark.parametrize(
    "text,match",
    [("", "is empty"), ("a: [1, 2\n", "YAML syntax error at line"), ("- 1\n- 2\n", "expected a mapping")],
)
def test_bad_files(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(TrainConfig, str(tmp_path / "nope.yaml"))


def test_saved_config_redacts_secrets(tmp_path):
    secret = "SECRET-abc123-DO-NOT-LEAK"
    cfg = load_config(
        TrainConfig,
        write(tmp_path, {**TRAIN, "storage_options": {"key": "AKIAFAKE", "secret": secret,
                                                      "client_kwargs": {"aws_session_token": secret},
                                                      "endpoint_url": "http://127.0.0.1:1"},
                         "model_loc": f"s3://user:{secret}@bucket/m.pth"}),
    )
    out = tmp_path / "resolved.yaml"
    save_resolved_config(cfg, str(out))
    text = out.read_text()
    assert secret not in text and "AKIAFAKE" not in text
    saved = yaml.safe_load(text)
    assert saved["storage_options"]["secret"] == REDACTED
    assert saved["storage_options"]["endpoint_url"] == "http://127.0.0.1:1"
    assert saved["epochs"] == cfg.epochs
    # the config object itself keeps the real values for the job to use
    assert cfg.storage_options["secret"] == secret


def test_every_field_is_documented():
    for cls in (TrainConfig, PredictConfig, LabelConfig):
        for name, _type, _default, description in field_docs(cls):
            assert description, f"{cls.__name__}.{name} has no description"
    beyond = {"storage_options", "runs_dir", "model_params", "device", "block_shape"}
    for cls in (TrainConfig, PredictConfig):
        for name, _t, _d, description in field_docs(cls):
            if name in beyond:
                assert "Beyond the design" in description, name
