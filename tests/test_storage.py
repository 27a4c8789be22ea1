"""Storage: URLs to Zarr (local, memory, S3), both Zarr formats, compatibility, TIFF."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import zarr

from catena_mito import storage
from catena_mito.errors import DataError, StorageError


@pytest.fixture(params=["local", "memory"])
def store_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "data.zarr")
    return f"memory://storage-{uuid.uuid4().hex}.zarr"


def test_create_write_read_roundtrip_with_spatial_attrs(store_url):
    url = storage.join_url(store_url, storage.RAW_PATH)
    data = np.arange(6 * 7 * 8, dtype=np.uint8).reshape(6, 7, 8)
    arr = storage.create_array(url, data.shape, np.uint8, (4, 4, 4),
                               attrs=storage.spatial_attrs((8, 4, 4), (0, 40, 80)))
    arr[:] = data
    again = storage.open_volume(url)
    np.testing.assert_array_equal(again[:], data)
    assert storage.read_spatial(again) == ((8.0, 4.0, 4.0), (0.0, 40.0, 80.0))
    # the parent groups exist, so the whole layout opens as a group
    group = storage.open_group(store_url)
    assert "raw" in group["volumes"]


def test_reopen_compatible_and_refuse_incompatible(store_url):
    url = storage.join_url(store_url, storage.prediction_path("mito"))
    a = storage.create_array(url, (8, 8, 8), "uint8", (4, 4, 4))
    a[:] = 7
    # the same geometry is reused: what is there stays (resume, concurrent shards)
    b = storage.create_array(url, (8, 8, 8), "uint8", (4, 4, 4))
    assert b[0, 0, 0] == 7
    for kwargs, what in [
        (dict(shape=(8, 8, 9), dtype="uint8", chunks=(4, 4, 4)), "shape"),
        (dict(shape=(8, 8, 8), dtype="float32", chunks=(4, 4, 4)), "dtype"),
        (dict(shape=(8, 8, 8), dtype="uint8", chunks=(8, 8, 8)), "chunks"),
    ]:
        with pytest.raises(StorageError, match=f"exists and is incompatible.*{what}.*--overwrite"):
            storage.create_array(url, **kwargs)
    c = storage.create_array(url, (8, 8, 9), "uint8", (4, 4, 4), overwrite=True)
    assert c.shape == (8, 8, 9) and c[0, 0, 0] == 0


def test_reads_zarr_format_2(tmp_path):
    path = str(tmp_path / "v2.zarr")
    root = zarr.open_group(path, mode="w", zarr_format=2)
    raw = root.create_array("volumes/raw", shape=(4, 5, 6), dtype="uint8", chunks=(2, 2, 2))
    raw[:] = 3
    raw.attrs["resolution"] = [4, 4, 4]
    arr = storage.open_volume(storage.join_url(path, storage.RAW_PATH))
    assert arr.metadata.zarr_format == 2 and int(arr[1, 2, 3]) == 3
    assert storage.read_spatial(arr)[0] == (4.0, 4.0, 4.0)
    # outputs added to a format-2 store keep its format
    out = storage.create_array(storage.join_url(path, storage.INSTANCES_PATH), (4, 5, 6), "uint32", (2, 2, 2))
    assert out.metadata.zarr_format == 2


def test_errors_name_the_url(tmp_path):
    with pytest.raises(StorageError, match="nothing.zarr.*does not exist"):
        storage.open_array(str(tmp_path / "nothing.zarr"))
    with pytest.raises(StorageError, match="unsupported URL scheme 'gopher'"):
        storage.open_array("gopher://host/x.zarr")
    path = str(tmp_path / "g.zarr")
    storage.create_array(storage.join_url(path, "volumes/raw"), (2, 2, 2), "uint8", (2, 2, 2))
    with pytest.raises(StorageError, match="is a Zarr group, expected an array"):
        storage.open_array(storage.join_url(path, "volumes"))
    flat = storage.create_array(str(tmp_path / "flat.zarr"), (4, 4), "uint8", (2, 2))
    assert flat.ndim == 2
    with pytest.raises(DataError, match=r"2 dimensions \[4, 4\], expected 3"):
        storage.open_volume(str(tmp_path / "flat.zarr"))


def test_tiff_roundtrip_keeps_resolution(tmp_path):
    data = np.random.default_rng(0).integers(0, 2**20, (3, 5, 7), dtype=np.uint32)
    url = str(tmp_path / "sub" / "v.tif")
    storage.write_tiff(url, data, resolution=(30, 4, 4), offset=(0, 8, 8))
    back, meta = storage.read_tiff(url)
    np.testing.assert_array_equal(back, data)
    assert meta == {"resolution": [30.0, 4.0, 4.0], "offset": [0.0, 8.0, 8.0]}


def test_storage_options_fill_from_aws_environment(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    opts = storage.resolve_storage_options("s3://b/x.zarr")
    assert opts == {"key": "AKIAENV", "secret": "envsecret", "endpoint_url": "http://127.0.0.1:9",
                    "config_kwargs": {"retries": storage.S3_RETRIES}}  # bounded retries by default
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore's own variable then decides
    assert "config_kwargs" not in storage.resolve_storage_options("s3://b/x.zarr")
    # explicit options win; local URLs get nothing from the environment
    assert storage.resolve_storage_options("s3://b/x", {"key": "k", "secret": "s"})["key"] == "k"
    assert storage.resolve_storage_options("/tmp/x.zarr") == {}


def test_redact_url():
    assert storage.redact_url("s3://AKIA:secret@bucket/x") == "s3://***@bucket/x"
    assert storage.redact_url("/plain/path") == "/plain/path"


@pytest.mark.s3
def test_s3_roundtrip_zarr_and_config(s3_server, monkeypatch):
    from catena_mito.config import TrainConfig, load_config

    bucket = s3_server.make_bucket()
    opts = s3_server.storage_options
    url = f"s3://{bucket}/data.zarr/{storage.RAW_PATH}"
    data = np.random.default_rng(1).integers(0, 255, (9, 10, 11), dtype=np.uint8)
    arr = storage.create_array(url, data.shape, "uint8", (4, 4, 4), attrs=storage.spatial_attrs((8, 8, 8)),
                               storage_options=opts)
    arr[:] = data
    np.testing.assert_array_equal(storage.open_volume(url, opts)[:], data)
    assert "raw" in storage.open_group(f"s3://{bucket}/data.zarr", storage_options=opts)["volumes"]

    # a config read from S3, credentials from the standard environment variables
    storage.write_bytes(f"s3://{bucket}/train.yaml", b"train_zarr_dirs: [s3://b/x.zarr]\nepochs: 2\n", opts)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    assert load_config(TrainConfig, f"s3://{bucket}/train.yaml").epochs == 2

    # credentials are enforced: a wrong secret is refused, and never shown
    bad = {**opts, "secret": "WRONG-SECRET-xyz"}
    with pytest.raises(StorageError) as info:
        storage.open_volume(url, bad)
    assert "WRONG-SECRET-xyz" not in str(info.value)


def test_open_group_append_survives_a_concurrent_creation(tmp_path, monkeypatch):
    """Deterministic race: the group appears between mode "a"'s look and its create (zarr
    then raises ContainsGroupError); open_group opens the one the other shard made."""
    import zarr.api.asynchronous
    from zarr.core.group import AsyncGroup

    url = str(tmp_path / "race.zarr")
    original = AsyncGroup.from_store.__func__
    calls = []

    async def create_first(cls, store, **kw):
        if not calls:  # the concurrent shard wins, once
            calls.append(1)
            await zarr.api.asynchronous.open_group(store=str(tmp_path / "race.zarr"), mode="w-",
                                                   attributes={"by": "other"})
        return await original(cls, store, **kw)

    monkeypatch.setattr(AsyncGroup, "from_store", classmethod(create_first))
    group = storage.open_group(url, mode="a")
    assert calls and dict(group.attrs) == {"by": "other"}


def _create_groups(args):
    urls, barrier = args
    from catena_mito import storage as st

    for url in urls:
        barrier.wait(timeout=60)  # every process creates the same group at the same moment
        st.open_group(url, mode="a")
        st.open_group(url + "/inner", mode="a")
    return True


def test_open_group_append_from_concurrent_processes(tmp_path):
    """Several processes create the same groups at once: none fails, all see one group."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    n, rounds = 4, 12
    urls = [str(tmp_path / f"g{k}.zarr") for k in range(rounds)]
    with ctx.Manager() as manager:
        barrier = manager.Barrier(n)
        with ctx.Pool(n) as pool:
            assert pool.map(_create_groups, [(urls, barrier)] * n) == [True] * n
    for url in urls:
        assert "inner" in storage.open_group(url)


def test_local_write_lands_when_another_process_removes_its_folder(tmp_path, monkeypatch):
    """Deterministic race: the folder (and the temporary file in it) is removed between the
    write and the rename, as by another shard cleaning up the prefix it completed; the
    write starts again and lands, as a PUT into a deleted prefix of an object store does."""
    import os
    import shutil

    folder = tmp_path / "pieces" / "3"
    url = str(folder / "000.blosc")
    replace = os.replace
    removed = []

    def remove_then_replace(src, dst):
        if not removed:
            removed.append(1)
            shutil.rmtree(tmp_path / "pieces")
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", remove_then_replace)
    storage.write_bytes(url, b"sums")
    assert removed and storage.read_bytes(url) == b"sums"
    assert sorted(p.name for p in folder.iterdir()) == ["000.blosc"]  # no temporary file left


def test_local_writes_racing_one_removal_of_their_prefix_never_fail(tmp_path):
    """One thread writes files under a prefix while another removes the prefix once (the
    end of a run racing a duplicate shard): no write fails; each either survived or was
    removed. Before write_bytes retried, about one round in fifteen failed."""
    import shutil
    import threading

    errors = []
    for r in range(40):
        prefix = tmp_path / f"run{r}"
        for i in range(10):
            storage.write_bytes(str(prefix / str(i) / "000.blosc"), b"x", sync=False)

        def write(prefix=prefix):
            for i in range(30):
                try:
                    storage.write_bytes(str(prefix / str(i % 5) / f"{i}.blosc"), b"y" * 1000, sync=False)
                except StorageError as e:
                    errors.append(e)

        writer = threading.Thread(target=write)
        writer.start()
        shutil.rmtree(prefix, ignore_errors=True)
        writer.join()
    assert not errors, errors[:3]


def test_remove_dead_temporaries_removes_only_what_dead_or_stale_writers_left(tmp_path):
    """A killed writer's temporary (this host, its pid gone) is removed at once; a live
    writer's never; another host's (or an unnamed zarr one) only once it is stale."""
    import os
    import subprocess
    import sys
    import time

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = storage._HOST
        folder = tmp_path / "out.zarr" / "c" / "0" / "0"
        folder.mkdir(parents=True)
        names = {
            "dead": f".1.tmp-{host}-{gone.pid}-0123abcd",
            "live": f".2.tmp-{host}-{alive.pid}-0123abcd",
            "mine": f".3.tmp-{host}-{os.getpid()}-0123abcd",
            "other host, fresh": f".4.tmp-node_7-{gone.pid}-0123abcd",
            "other host, stale": f".5.tmp-node_7-{gone.pid}-0123abcd",
            "zarr, fresh": "6." + "a" * 32 + ".partial",
            "zarr, stale": "7." + "b" * 32 + ".partial",
            "no host, stale": f".8.tmp-{gone.pid}-0123abcd",
            "a chunk": "9",
            "a look-alike": ".9.tmp-notes",
        }
        for name in names.values():
            (folder / name).write_bytes(b"x")
        old = time.time() - storage.TEMP_STALE_SECONDS - 1
        for key in ("other host, stale", "zarr, stale", "no host, stale"):
            os.utime(folder / names[key], (old, old))
        assert storage.remove_dead_temporaries(str(tmp_path / "out.zarr")) == 4
        left = {key for key, name in names.items() if (folder / name).exists()}
        assert left == {"live", "mine", "other host, fresh", "zarr, fresh", "a chunk", "a look-alike"}
        assert storage.remove_dead_temporaries("memory://nothing-here") == 0
    finally:
        alive.kill()
        alive.wait()


def test_zarr_writes_name_their_writer(tmp_path, monkeypatch):
    """Every chunk and metadata file of a Zarr array written here goes through a temporary
    that names this host and process (zarr's own names neither), so a sweep can tell a
    killed writer's leftover from a live writer's file."""
    import os

    replace = os.replace
    temporaries = []

    def recording(src, dst):
        temporaries.append(os.path.basename(src))
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", recording)
    arr = storage.create_array(str(tmp_path / "a.zarr"), (4, 4, 8), "uint8", (4, 4, 4))
    arr[:] = 1
    monkeypatch.undo()
    assert len(temporaries) >= 3  # zarr.json and two chunks
    for name in temporaries:
        m = storage._TEMP_NAME.match(name)
        assert m and m["host"] == storage._HOST and m["pid"] == str(os.getpid()), name
    np.testing.assert_array_equal(storage.open_array(str(tmp_path / "a.zarr"))[...], 1)
