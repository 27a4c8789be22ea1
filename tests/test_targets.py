"""The target rules every command shares: channels, probabilities, the contour target."""

import numpy as np
import pytest
import torch

from catena_mito import targets
from catena_mito.errors import CheckpointError, ConfigError


def test_single_target_keeps_the_softmax_layout():
    logits = torch.randn(2, 2, 3, 4, 5)
    p = targets.probabilities(logits, ["foreground"])
    assert p.shape == (2, 1, 3, 4, 5)
    assert torch.equal(p[:, 0], torch.softmax(logits, dim=1)[:, 1])
    assert targets.out_channels(["foreground"]) == 2
    assert targets.checkpoint_targets({}) == ("foreground",)


def test_several_targets_are_a_sigmoid_each_in_canonical_order():
    logits = torch.randn(2, 2, 3, 4, 5)
    assert targets.validate_targets(["contour", "foreground"]) == ("foreground", "contour")
    assert torch.equal(targets.probabilities(logits, ["foreground", "contour"]), torch.sigmoid(logits))
    with pytest.raises(CheckpointError, match="3 output channels"):
        targets.probabilities(torch.randn(1, 3, 2, 2, 2), ["foreground", "contour"])


@pytest.mark.parametrize("bad", [["contour"], ["foreground", "foreground"], ["foreground", "edges"]])
def test_bad_targets_are_refused(bad):
    with pytest.raises(ConfigError):
        targets.validate_targets(bad)


def test_prediction_urls_sit_beside_the_foreground():
    url = "s3://b/d.zarr/volumes/predictions/mito"
    assert targets.prediction_url(url, "foreground") == url
    assert targets.prediction_url(url + "/", "contour") == url + "_contour"


def test_instance_contour_marks_both_sides_of_a_touching_pair_and_no_volume_edge():
    ids = np.zeros((1, 1, 10), dtype=np.uint32)
    ids[..., 2:5] = 1
    ids[..., 5:9] = 2
    got = targets.instance_contour(ids, width=1)[0, 0]
    assert got.tolist() == [False, False, True, False, True, True, False, False, True, False]
    edge = np.ones((3, 3, 3), dtype=np.uint32)
    assert not targets.instance_contour(edge).any()
    assert targets.instance_contour(ids, width=2)[0, 0, 2:9].all()
