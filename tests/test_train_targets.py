"""Training several targets (foreground + instance contour): config, data, loss, checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_train import TINY, datasets, run_dir, tiny_config  # noqa: F401 - fixture

from catena_mito import data
from catena_mito.checkpoint import (
    build_model_from_checkpoint,
    load_checkpoint,
    make_payload,
    save_checkpoint,
)
from catena_mito.config import TrainConfig, config_from_dict
from catena_mito.errors import CheckpointError, ConfigError
from catena_mito.inference import sliding_window_predict
from catena_mito.models import build_model
from catena_mito.target_loss import MultiTargetLoss
from catena_mito.targets import checkpoint_targets, instance_contour, probabilities
from catena_mito.train import build_loss, model_params_for, target_probabilities, train

TWO = ["foreground", "contour"]


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"targets": ["contour"]}, "must include 'foreground'"),
        ({"targets": ["foreground", "foreground"]}, "repeat"),
        ({"targets": ["foreground", "edges"]}, "targets"),
        ({"targets": TWO, "label_type": "neuron"}, "label_type 'mito'"),
        ({"targets": TWO, "dice_include_background": True}, "dice_include_background"),
        ({"targets": TWO, "model_params": {"out_channels": 3}}, "out_channels"),
        ({"contour_width": 2}, "contour_width"),
        ({"contour_pos_weight": 5.0}, "contour_pos_weight"),
        ({"targets": TWO, "loss_type": "DiceLoss", "contour_pos_weight": 5.0}, "contour_pos_weight"),
    ],
)
def test_bad_target_settings_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(TrainConfig, {"train_zarr_dirs": ["x"], **values}, "train.yaml")


def test_targets_are_put_in_channel_order_and_set_the_channels():
    cfg = TrainConfig(train_zarr_dirs=["x"], targets=["contour", "foreground"], model_params={"channels": [4, 8]})
    assert cfg.targets == TWO
    assert model_params_for(cfg) == {"channels": [4, 8], "out_channels": 2}
    # one target: the model_params exactly as given (today's 2-channel softmax by default)
    assert model_params_for(TrainConfig(train_zarr_dirs=["x"])) == {}


@pytest.mark.parametrize("model_type", ["monai_unet", "rs_unet", "xie"])
def test_both_backbones_build_one_channel_per_target(model_type):
    params = dict(TINY["rs_unet" if model_type == "xie" else model_type])
    if model_type == "xie":
        params = {"variant": "xie", "channels": [4, 8, 16]}
        model_type = "rs_unet"
    cfg = TrainConfig(train_zarr_dirs=["x"], model_type=model_type, model_params=params, targets=TWO)
    model = build_model(model_type, **model_params_for(cfg))
    x = torch.zeros(1, 1, 16, 32, 32) if params.get("variant") == "xie" else torch.zeros(1, 1, 16, 16, 16)
    assert model(x).shape[1] == 2
    payload = make_payload(model_type, model_params_for(cfg), model, targets=TWO, contour_width=1)
    assert build_model_from_checkpoint(payload)(x).shape[1] == 2


# --- data: the contour target ---------------------------------------------------------------


def _volume(ids: np.ndarray, width: int = 1) -> data.TrainingVolume:
    raw = np.random.default_rng(0).random(ids.shape, dtype=np.float32)
    return data.TrainingVolume(url="mem", raw=raw, label=(ids != 0).astype(np.uint8), resolution=None,
                               contour=instance_contour(ids, width))


def _touching_ids(shape=(8, 12, 12)) -> np.ndarray:
    ids = np.zeros(shape, np.uint32)
    ids[1:7, 2:10, 1:6] = 3  # two boxes that touch along x = 5 | 6
    ids[2:8, 3:11, 6:11] = 7
    ids[0:3, 0:3, 9:12] = 9  # one cut by the volume's edge
    return ids


def test_contour_is_the_whole_volume_contour_not_a_patch_one():
    """A patch cut through an object gets no false rim along its cut (the contour is derived
    once from the whole label volume)."""
    ids = _touching_ids()
    vol = _volume(ids)
    ds = data.PatchDataset([vol], [data.PatchRef(0, (0, 0, 3))], (8, 8, 8), targets=TWO)
    _, label = ds[0]
    sl = (slice(0, 8), slice(0, 8), slice(3, 11))
    assert label.shape == (2, 8, 8, 8)
    assert np.array_equal(label[0].numpy(), ids[sl] != 0)
    assert np.array_equal(label[1].numpy(), instance_contour(ids)[sl])
    assert not np.array_equal(label[1].numpy(), instance_contour(ids[sl]))  # a per-patch rim would differ


def test_contour_follows_rotations_and_flips():
    """Every draw's contour channel is the contour of the identically transformed labels."""
    ids = _touching_ids((8, 12, 12))
    vol = _volume(ids, width=2)
    augmenter = data.Augmenter(rotation=True, contrast=False)
    ds = data.PatchDataset([vol], [data.PatchRef(0, (0, 0, 0))], (8, 12, 12), augmenter, seed=3, targets=TWO)
    seen = set()
    for draw in range(12):
        image, label = ds[(0, draw, 0)]
        rng = np.random.default_rng([3, 0, draw])
        raw_t, ids_t = augmenter(vol.raw, ids, rng)  # the same transform, applied to the ids
        assert np.array_equal(image[0].numpy(), raw_t)
        assert np.array_equal(label[0].numpy(), ids_t != 0)
        assert np.array_equal(label[1].numpy(), instance_contour(ids_t, 2))
        seen.add(label[1].numpy().tobytes())
    assert len(seen) > 4  # the draws really transformed the patch


def test_single_target_items_are_unchanged():
    ids = _touching_ids()
    vol = _volume(ids)
    augmenter = data.Augmenter(rotation=True, contrast=False, elastic=1.0)
    one = data.PatchDataset([vol], [data.PatchRef(0, (0, 0, 0))], (8, 12, 12), augmenter)
    two = data.PatchDataset([vol], [data.PatchRef(0, (0, 0, 0))], (8, 12, 12), augmenter, targets=TWO)
    for draw in range(3):
        (im1, lab1), (im2, lab2) = one[(0, draw, 0)], two[(0, draw, 0)]
        assert lab1.shape == (1, 8, 12, 12) and lab1.dtype == torch.uint8
        assert torch.equal(im1, im2) and torch.equal(lab1[0], lab2[0])


# --- the loss -------------------------------------------------------------------------------


def _bce(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0) - z * y


def _dice(p: np.ndarray, y: np.ndarray) -> float:
    return 1 - (2 * (p * y).sum() + 1e-5) / (p.sum() + y.sum() + 1e-5)


def test_two_target_loss_equals_a_hand_computed_reference():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(2, 2, 3, 4, 5))
    y = np.zeros_like(z)
    y[:, 0] = rng.random((2, 3, 4, 5)) < 0.4
    y[:, 1] = y[:, 0] * (rng.random((2, 3, 4, 5)) < 0.2)
    p = 1 / (1 + np.exp(-z))
    logits, target = torch.tensor(z, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)

    # foreground: loss_weights 5.0 -> background 1, foreground 5; contour: balanced by the batch
    w_fg = np.where(y[:, 0] == 1, 5.0, 1.0)
    r = np.clip(y[:, 1].mean(), 0.05, 0.95)
    w_c = np.where(y[:, 1] == 1, (1 - r) / r, 1.0)
    fg = _dice(p[:, 0], y[:, 0]) + (w_fg * _bce(z[:, 0], y[:, 0])).sum() / w_fg.sum()
    rim = _dice(p[:, 1], y[:, 1]) + (w_c * _bce(z[:, 1], y[:, 1])).sum() / w_c.sum()
    loss = build_loss("DiceCE", 5.0, 2, targets=TWO)
    assert float(loss(logits, target)) == pytest.approx(fg + rim, rel=1e-9)

    # a fixed contour weight; DiceLoss = the two Dice terms; per-patch Dice
    w_c = np.where(y[:, 1] == 1, 7.0, 1.0)
    rim = _dice(p[:, 1], y[:, 1]) + (w_c * _bce(z[:, 1], y[:, 1])).sum() / w_c.sum()
    fg = _dice(p[:, 0], y[:, 0]) + _bce(z[:, 0], y[:, 0]).mean()
    assert float(build_loss("DiceCE", None, 2, targets=TWO, contour_pos_weight=7.0)(logits, target)) == pytest.approx(fg + rim, rel=1e-9)
    dice_only = _dice(p[:, 0], y[:, 0]) + _dice(p[:, 1], y[:, 1])
    assert float(build_loss("DiceLoss", None, 2, targets=TWO)(logits, target)) == pytest.approx(dice_only, rel=1e-9)
    per_patch = np.mean([_dice(p[n, 0], y[n, 0]) for n in range(2)]) + np.mean([_dice(p[n, 1], y[n, 1]) for n in range(2)])
    assert float(build_loss("DiceLoss", None, 2, targets=TWO, batch=False)(logits, target)) == pytest.approx(per_patch, rel=1e-9)
    with pytest.raises(ConfigError, match="DiceLoss"):
        build_loss("DiceLoss", 5.0, 2, targets=TWO)


def test_balanced_weights_match_weight_binary_ratio():
    loss = MultiTargetLoss("DiceCE", TWO)
    y = torch.zeros(1, 100)
    y[0, :2] = 1  # 2 % positive: clipped to 5 % -> weight 19
    w = loss.voxel_weights("contour", y)
    assert float(w[0, 0]) == pytest.approx(19.0) and float(w[0, 50]) == 1.0
    assert torch.equal(loss.voxel_weights("contour", torch.zeros(1, 10)), torch.ones(1, 10))


# --- checkpoints and validation -------------------------------------------------------------


def test_two_targets_are_trained_recorded_and_read_back(tmp_path, datasets):  # noqa: F811
    cfg = tiny_config(tmp_path, datasets, targets=TWO, contour_width=2, epochs=1)
    result = train(cfg)
    ckpt = load_checkpoint(str(run_dir(cfg) / "last.pth"))
    assert ckpt["targets"] == TWO and ckpt["contour_width"] == 2
    assert checkpoint_targets(ckpt) == tuple(TWO)
    assert ckpt["model_params"]["out_channels"] == 2
    final = result.history[-1]
    assert {"val_iou", "val_contour_iou", "val_instance_f1"} <= final.keys()

    # validation scores the foreground channel's sigmoid, exactly as probabilities() defines it
    model = build_model_from_checkpoint(ckpt).eval()
    raw = np.random.default_rng(0).random((16, 16, 16), dtype=np.float32)
    probs = target_probabilities(model, raw, (16, 16, 16), TWO)
    with torch.no_grad():
        expected = probabilities(model(torch.from_numpy(raw)[None, None]), TWO)[0].numpy()
    np.testing.assert_allclose(probs["foreground"], expected[0], atol=1e-6)
    np.testing.assert_allclose(probs["contour"], expected[1], atol=1e-6)

    # fine-tuning or resuming with other targets says so
    other = tiny_config(tmp_path, datasets, exp_name="other", epochs=1, model_loc=str(run_dir(cfg) / "last.pth"))
    with pytest.raises(CheckpointError, match="targets"):
        train(other)


def test_old_checkpoint_without_targets_predicts_as_before(tmp_path):
    model = build_model("monai_unet", **TINY["monai_unet"]).eval()
    payload = make_payload("monai_unet", TINY["monai_unet"], model)
    assert payload["targets"] == ["foreground"] and "contour_width" not in payload
    del payload["targets"]  # as written before targets existed
    save_checkpoint(str(tmp_path / "old.pth"), payload)
    old = load_checkpoint(str(tmp_path / "old.pth"))
    assert checkpoint_targets(old) == ("foreground",)
    rebuilt = build_model_from_checkpoint(old).eval()
    raw = np.random.default_rng(2).random((16, 24, 24), dtype=np.float32)
    before = sliding_window_predict(model, raw, (16, 16, 16))
    assert np.array_equal(sliding_window_predict(rebuilt, raw, (16, 16, 16)), before)
    assert np.array_equal(target_probabilities(rebuilt, raw, (16, 16, 16), ["foreground"])["foreground"], before)


def test_checkpoint_whose_channels_do_not_fit_its_targets_is_refused():
    model = build_model("rs_unet", **TINY["rs_unet"])  # 2 channels
    with pytest.raises(CheckpointError, match="contour_width"):
        make_payload("rs_unet", TINY["rs_unet"], model, targets=TWO)
    payload = make_payload("rs_unet", {**TINY["rs_unet"], "out_channels": 2}, model, targets=TWO, contour_width=1)
    payload["targets"] = ["foreground", "contour", "contour"]
    with pytest.raises(CheckpointError, match="targets"):
        build_model_from_checkpoint(payload)
    three = build_model("rs_unet", **{**TINY["rs_unet"], "out_channels": 3})
    with pytest.raises(CheckpointError, match="3 output channels"):
        make_payload("rs_unet", {**TINY["rs_unet"], "out_channels": 3}, three, targets=TWO, contour_width=1)
