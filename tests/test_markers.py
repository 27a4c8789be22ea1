"""Done markers: written atomically after the data, listed, cleared."""

from __future__ import annotations

import os
import uuid

from catena_mito.blockwise.markers import DoneMarkers


def _root() -> str:
    return f"memory://markers-{uuid.uuid4().hex}.zarr/arr/.catena/predict/runs/abc/predict/done"


def test_mark_list_clear():
    markers = DoneMarkers(_root())
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


def test_folders_are_independent():
    a, b = _root(), _root()
    DoneMarkers(a).mark_done(1)
    assert DoneMarkers(b).done_indices() == set()


def test_local_markers_are_plain_files_with_times(tmp_path):
    markers = DoneMarkers(str(tmp_path / "done"))
    for i in range(3):
        markers.mark_done(i)
    assert sorted(os.listdir(tmp_path / "done")) == ["0.json", "1.json", "2.json"]
    times = markers.done_times()
    assert set(times) == {0, 1, 2} and all(t is not None and t > 0 for t in times.values())
