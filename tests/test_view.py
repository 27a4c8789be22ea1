"""The pipeline's outputs open as a viewer opens them: ome-zarr-py's reader (napari-ome-zarr)
finds raw and probabilities as images and predicted instances as labels at every pyramid
level with the right scale, and `view`'s neuroglancer state parses with neuroglancer's
own state model."""

from __future__ import annotations

import json
import threading
import urllib.request

import numpy as np
import pytest
import zarr
from test_ome import _nodes
from test_predict import MODEL_PARAMS, PATCH, deterministic_model

from catena_mito import ome, storage
from catena_mito.checkpoint import make_payload, save_checkpoint
from catena_mito.cli import main
from catena_mito.config import LabelConfig, PredictConfig, config_from_dict
from catena_mito.label import label
from catena_mito.predict import predict
from catena_mito.pyramid import downsample, reduction_factors
from catena_mito.status import status
from catena_mito.synthetic import write_synthetic_dataset
from catena_mito.view import (
    dataset_volumes,
    http_base,
    make_server,
    napari_command,
    neuroglancer_state,
    neuroglancer_url,
)

RES = (8.0, 8.0, 8.0)
pytestmark = pytest.mark.slow  # one tiny pipeline run (predict, label, pyramids): ~8 s


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny pipeline run: synth, predict and label with pyramids, then raw's pyramid by the CLI."""
    base = tmp_path_factory.mktemp("view")
    ckpt = str(base / "model.pth")
    train_cfg = {"patch_size": list(PATCH), "stride": list(PATCH), "clahe": False,
                 "original_res": None, "target_res": None, "label_type": "mito"}
    save_checkpoint(ckpt, make_payload("monai_unet", MODEL_PARAMS, deterministic_model(), epoch=1, config=train_cfg))
    url = write_synthetic_dataset(str(base / "d.zarr"), shape=(16, 32, 32), seed=0, resolution=RES, chunks=(8, 16, 16))
    predict(config_from_dict(PredictConfig, {
        "model_path": ckpt, "test_zarr_dirs": [url], "device": "cpu", "stride": list(PATCH),
        "block_shape": [8, 16, 16], "output_chunks": [8, 16, 16], "pyramid_levels": 2}), num_shards=2, shard_index=1)
    predict(config_from_dict(PredictConfig, {  # the shard that completes the output builds its levels
        "model_path": ckpt, "test_zarr_dirs": [url], "device": "cpu", "stride": list(PATCH),
        "block_shape": [8, 16, 16], "output_chunks": [8, 16, 16], "pyramid_levels": 2}), num_shards=2, shard_index=0)
    label(config_from_dict(LabelConfig, {
        "input_prediction_path": storage.join_url(url, storage.prediction_path("mito")),
        "output_instance_dir": storage.join_url(url, "volumes/labels"), "chunk_size": [8, 16, 16],
        "thres_small_instances": 0, "thres_foreground": 0.5, "pyramid_levels": 2}))
    main(["pyramid", storage.join_url(url, storage.RAW_PATH), storage.join_url(url, storage.LABEL_PATHS["mito"]),
          storage.join_url(url, storage.LABEL_PATHS["neuron"]), "--levels", "2"])  # exits only on errors
    return url


def test_outputs_open_as_napari_opens_them_at_every_level(dataset):
    factors = [(1, 1, 1)]
    for f in reduction_factors(RES, (16, 32, 32), 2):
        factors.append(tuple(a * b for a, b in zip(factors[-1], f)))
    found = {}
    for path in ("volumes", storage.prediction_path("mito")):
        for where, kind, node in _nodes(storage.join_url(dataset, path)):
            found[where] = (kind, node)
    assert found["volumes"][0] == "image"
    assert found[storage.prediction_path("mito")][0] == "image"
    assert found[storage.INSTANCES_PATH][0] == "labels" and found[storage.LABEL_PATHS["mito"]][0] == "labels"
    for where in ("volumes", storage.prediction_path("mito"), storage.INSTANCES_PATH):
        kind, node = found[where]
        assert [d.shape for d in node.data] == [(16, 32, 32), (8, 16, 16), (4, 8, 8)], where
        transforms = node.metadata["coordinateTransformations"]
        for (scale, translation), f in zip(transforms, factors):
            assert scale["scale"] == [r * k for r, k in zip(RES, f)]
            assert translation["translation"] == [(k - 1) * r / 2 for r, k in zip(RES, f)]
    # The levels are the reductions of the level above (mean for probabilities, mode for ids).
    for where, method in ((storage.prediction_path("mito"), "mean"), (storage.INSTANCES_PATH, "mode")):
        data = [np.asarray(d) for d in found[where][1].data]
        assert data[0].any()
        np.testing.assert_array_equal(data[1], downsample(data[0], (2, 2, 2), method))
        np.testing.assert_array_equal(data[2], downsample(data[1], (2, 2, 2), method))
    # ome-zarr-models accepts them too (record folders inside the groups and all), and
    # `status` lists each pyramid run as complete.
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    for path in ("volumes", storage.prediction_path("mito")):
        Image.from_zarr(zarr.open_group(storage.join_url(dataset, path), mode="r"))
    ImageLabel.from_zarr(zarr.open_group(storage.join_url(dataset, storage.INSTANCES_PATH), mode="r"))
    pyramids = {e["output"]: e["state"] for e in status(dataset) if e["output"].endswith("(pyramid levels)")}
    assert len(pyramids) == 5 and set(pyramids.values()) == {"complete"}
    # The instances' label metadata names its image.
    group = storage.volume_group(storage.join_url(dataset, storage.INSTANCES_PATH))
    assert ome.ome_part(group.attrs.asdict(), 3)["image-label"] == {"source": {"image": "../../"}}


def test_neuroglancer_state_parses(dataset):
    neuroglancer = pytest.importorskip("neuroglancer")
    assert dataset_volumes(dataset) == {
        "image": [storage.RAW_PATH], "predictions": [storage.prediction_path("mito")],
        "labels": [storage.INSTANCES_PATH, storage.LABEL_PATHS["mito"], storage.LABEL_PATHS["neuron"]]}
    state = neuroglancer_state(dataset, port=8123)
    parsed = neuroglancer.viewer_state.ViewerState(state)
    assert [(layer.name, layer.type) for layer in parsed.layers] == [
        ("raw", "image"), ("mito", "image"), ("mito_instances", "segmentation"),
        ("mito_ids", "segmentation"), ("neuron_ids", "segmentation")]
    assert parsed.layers["raw"].source[0].url == "zarr3://http://127.0.0.1:8123/d.zarr/volumes/raw"
    assert not parsed.layers["mito_ids"].visible and parsed.layers["mito_instances"].visible
    assert list(parsed.dimensions.scales) == [8e-9] * 3 and list(parsed.dimensions.units) == ["m"] * 3
    # Our link decodes, with neuroglancer's own parser, to the same state.
    back = neuroglancer.parse_url(neuroglancer_url(state))
    assert back.to_json() == neuroglancer.viewer_state.ViewerState(state).to_json()
    assert napari_command(dataset).split()[3:] == [
        storage.join_url(dataset, "volumes"), storage.join_url(dataset, storage.prediction_path("mito"))]


def test_s3_sources_and_the_cors_server(dataset, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert http_base("s3://bucket/a/d.zarr", 0) == "s3://bucket/a/d.zarr"
    assert http_base("s3://bucket/a/d.zarr", 0, {"endpoint_url": "http://minio:9000/"}) == "http://minio:9000/bucket/a/d.zarr"
    server = make_server(dataset, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/d.zarr/volumes/raw/zarr.json") as r:
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert json.loads(r.read())["attributes"]["ome"]["multiscales"][0]["datasets"][0]["path"] == "0"
    finally:
        server.shutdown()
        server.server_close()


def test_cli_view_and_pyramid_dry_run(dataset, capsys, tmp_path):
    main(["view", dataset, "--json", "--port", "9001"])
    assert json.loads(capsys.readouterr().out) == neuroglancer_state(dataset, port=9001)
    main(["view", dataset])
    out = capsys.readouterr().out
    assert out.startswith("neuroglancer: https://") and "--serve 8000" in out and "napari --plugin napari-ome-zarr" in out
    main(["pyramid", storage.join_url(dataset, storage.RAW_PATH), "--levels", "2", "--dry-run"])
    out = capsys.readouterr().out
    assert "(this run), method mean" in out and "level 2: shape [4, 8, 8], factor [4, 4, 4]" in out
    # bad input: one line, non-zero exit, nothing written
    with pytest.raises(SystemExit) as e:
        main(["view", str(tmp_path / "nothing.zarr")])
    assert e.value.code != 0 and len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        main(["pyramid", storage.join_url(dataset, storage.RAW_PATH), "--levels", "0"])
    assert e.value.code == 2 and "levels" in capsys.readouterr().err
