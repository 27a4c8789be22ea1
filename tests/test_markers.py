"""Done markers: written atomically after the data, listed, cleared."""

from __future__ import annotations

import os
import uuid

import pytest

from catena_mito.blockwise.markers import DoneMarkers


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out.zarr" / "volumes" / "predictions" / "mito")
    return f"memory://markers-{uuid.uuid4().hex}.zarr/arr"


def test_mark_list_clear(root):
    markers = DoneMarkers(root, "predict")
    assert markers.done_indices() == set()
    assert not markers.is_done(3)
    markers.mark_done(3, {"shard": 1})
    markers.mark_done(10)
    assert markers.is_done(3) and markers.done_indices() == {3, 10}
    assert markers.read(3)["shard"] == 1
    assert markers.missing(range(5)) == [0, 1, 2, 4]
    markers.clear([3])
    assert markers.done_indices() == {10}
    markers.clear()
    assert markers.done_indices() == set()


def test_tasks_are_separate(root):
    DoneMarkers(root, "a").mark_done(1)
    assert DoneMarkers(root, "b").done_indices() == set()


def test_local_marker_write_leaves_no_temporary_files(tmp_path):
    markers = DoneMarkers(str(tmp_path / "arr"), "predict")
    for i in range(5):
        markers.mark_done(i)
    names = os.listdir(tmp_path / "arr" / ".catena" / "predict" / "done")
    assert sorted(names) == [f"{i}.json" for i in range(5)]
