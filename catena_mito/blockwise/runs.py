"""Runs: who owns an output, which blocks of it are done, and whether it is complete.

Every block-wise output has a *record folder* ``R`` (predict: ``<output array>/.catena/
predict``; label: ``<output_instance_dir>/.catena/label/<output_filename>``)::

    R/run.json                               the run that owns the output: its id, task,
                                             description and phases (the "claim")
    R/config.yaml                            the resolved config of the latest start
    R/runs/<id>/<phase>/done/<block>.json    done markers (after the block's data)
    R/runs/<id>/<phase>/shards/<k>of<n>.json what each shard did: running, finished, stopped, failed
    R/runs/<id>/<phase>/lease.json           single-process phases: who is running it now
    R/runs/<id>/complete.json                written once every block of every phase is done

and its array carries ``catena_run = {"task", "run_id", "record"}`` (``record`` relative
to the array), so a consumer that opens the array finds the record.

Claiming (:meth:`RunStore.claim`): a job that starts reads ``run.json``.

* no claim, or the same run id: it (re)joins the run and skips the blocks done for it;
  shards of one run compute the same id independently, so they agree without talking;
* another run id: refused before any work with one line naming what changed, unless
  ``--overwrite``, which makes this run the owner (the other run's records are removed;
  its data is overwritten block by block and nothing of it counts as done).

A consumer (:func:`check_input`) refuses a catena-mito input whose run is not complete,
or whose record no longer matches the array or its own inputs.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from catena_mito import storage
from catena_mito.blockwise.identity import (
    RUN_ATTR,
    bytes_digest,
    differences,
    fingerprint,
    foreign_identity,
    normalise,
)
from catena_mito.blockwise.markers import DoneMarkers
from catena_mito.errors import IncompleteInputError, PhaseError, RunMismatchError, StorageError

log = logging.getLogger(__name__)

#: Seconds after which a single-process lease without a heartbeat counts as abandoned.
LEASE_STALE_SECONDS = 60.0
LEASE_HEARTBEAT_SECONDS = 10.0


@dataclass(frozen=True)
class RunSpec:
    """What determines a run's output, and its plan.

    ``description``: JSON-able settings, inputs and plan (see
    :mod:`catena_mito.blockwise.identity`). ``phases``: ``(name, number of blocks)`` in
    the order they run; the run is complete when every block of every phase is done.
    """

    task: str
    description: Mapping[str, Any]
    phases: tuple[tuple[str, int], ...]

    @cached_property
    def run_id(self) -> str:
        return fingerprint({"task": self.task, "description": _content_only(self.description),
                            "phases": self.phases})

    def num_blocks(self, phase: str) -> int:
        return dict(self.phases)[phase]

    def record(self) -> dict[str, Any]:
        return normalise({"run_id": self.run_id, "task": self.task, "description": self.description,
                          "phases": [list(p) for p in self.phases]})


def _content_only(description: Mapping[str, Any]) -> dict[str, Any]:
    """The description without the URLs of inputs known by content (a checkpoint's hash,
    a catena output's run id): the same model or prediction at another path, or spelt
    another way, is the same input. A foreign volume is known by cheap metadata only, so
    its (normalised) URL stays part of its identity."""
    out = dict(description)
    inputs = out.get("inputs")
    if isinstance(inputs, Mapping):
        out["inputs"] = {name: ({k: v for k, v in ident.items() if k != "url"}
                                if isinstance(ident, Mapping) and ident.get("kind") in ("checkpoint", "catena")
                                else ident)
                         for name, ident in inputs.items()}
    return out


def normalise_url(url: str) -> str:
    """One spelling per location: absolute local paths, no ``..``, ``.``, ``//`` or trailing ``/``."""
    scheme, path = _split(url)
    path = posixpath.normpath(path)
    return f"{scheme}{path.lstrip('/')}" if scheme else path


def utc(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def relative_url(base: str, target: str) -> str:
    """``target`` relative to ``base`` (both URLs on the same store)."""
    b, t = _split(base), _split(target)
    if b[0] != t[0]:
        raise ValueError(f"{target!r} and {base!r} are not on one store")
    return posixpath.relpath(t[1], b[1])


def resolve_url(base: str, relative: str) -> str:
    """The URL ``relative`` points to from ``base`` (``..`` allowed)."""
    scheme, path = _split(base)
    joined = posixpath.normpath(posixpath.join(path, relative))
    return f"{scheme}{joined.lstrip('/')}" if scheme else joined


def _within(url: str, folder: str) -> bool:
    (a_scheme, a), (b_scheme, b) = _split(url), _split(folder)
    return a_scheme == b_scheme and (a == b or a.startswith(b.rstrip("/") + "/"))


def _split(url: str) -> tuple[str, str]:
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return scheme + "://", "/" + rest.rstrip("/")
    return "", os.path.abspath(url)


class RunStore:
    """The record folder of one output (see the module docstring)."""

    def __init__(self, root_url: str, storage_options: Mapping[str, Any] | None = None, shown: str | None = None,
                 outputs: Sequence[str] = ()):
        self.root_url = root_url
        self.options = dict(storage_options or {})
        self.shown = shown or storage.redact_url(root_url)
        #: the folders the run writes, swept of killed writers' temporary files when it completes
        self.outputs = tuple(outputs)

    # -- paths ----------------------------------------------------------------------------

    def url(self, *parts: str) -> str:
        return storage.join_url(self.root_url, *parts)

    def run_url(self, run_id: str, *parts: str) -> str:
        return self.url("runs", run_id, *parts)

    def markers(self, run_id: str, phase: str) -> DoneMarkers:
        return DoneMarkers(self.run_url(run_id, phase, "done"), self.options)

    def current_markers(self, phase: str) -> DoneMarkers:
        """The done markers of ``phase`` of the run that owns the output now."""
        claim = self.read_claim()
        if claim is None:
            raise PhaseError(f"{self.shown} has no run recorded")
        return self.markers(str(claim["run_id"]), phase)

    # -- the claim ------------------------------------------------------------------------

    def read_claim(self) -> dict[str, Any] | None:
        url = self.url("run.json")
        return storage.read_json(url, self.options) if storage.exists(url, self.options) else None

    def claim(self, spec: RunSpec, *, overwrite: bool, may_claim: bool = True, fix: str = "") -> bool:
        """Make sure ``spec``'s run owns this output; True when it just became the owner.

        Raises :class:`RunMismatchError` (before any work) when another run owns it and
        ``overwrite`` is off, or when ``may_claim`` is off (a later phase: only the first
        phase of a run may claim) and the owner is not this run.
        """
        current = self.read_claim()
        if current is not None and current.get("run_id") == spec.run_id:
            return False
        if current is not None and (not overwrite or not may_claim):
            raise RunMismatchError(self.mismatch_message(current, spec, fix))
        if current is None and not may_claim:
            raise PhaseError(f"{self.shown} has no run recorded; {fix or 'run its first phase first'}")
        storage.write_json(self.url("run.json"), spec.record(), self.options)
        if current is not None:
            log.info("%s: run %s replaces run %s (--overwrite)", self.shown, spec.run_id, current.get("run_id"))
            storage.remove(self.run_url(str(current.get("run_id"))), self.options)
        return True

    def mismatch_message(self, current: Mapping[str, Any], spec: RunSpec, fix: str = "") -> str:
        diffs = differences(current.get("description", {}), spec.description)
        if not diffs:
            diffs = differences(current.get("phases"), normalise([list(p) for p in spec.phases]), "phases")
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        return (f"{self.shown} holds the output of another run ({current.get('run_id')}, now "
                f"{spec.run_id}): {shown or 'different settings'}; "
                f"{fix or 'rerun with --overwrite to recompute it'}")

    def verify_owner(self, run_id: str) -> dict[str, Any] | None:
        """None while ``run_id`` still owns the output, else the new owner's claim."""
        current = self.read_claim()
        return None if current is not None and current.get("run_id") == run_id else (current or {})

    # -- shards, completeness -------------------------------------------------------------

    def write_shard_record(self, run_id: str, phase: str, shard_index: int, num_shards: int,
                           state: str, **info: Any) -> None:
        record = {"shard_index": shard_index, "num_shards": num_shards, "state": state,
                  "time": time.time(), "host": socket.gethostname(), "pid": os.getpid(), **info}
        storage.write_json(self.run_url(run_id, phase, "shards", f"{shard_index}of{num_shards}.json"),
                           record, self.options)

    def shard_records(self, run_id: str, phase: str) -> list[dict[str, Any]]:
        fs, path = storage.get_fs(self.run_url(run_id, phase, "shards"), self.options)
        try:
            fs.invalidate_cache(path)
            names = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        scheme = storage.url_scheme(self.root_url)
        records = []
        for name in sorted(names):
            if not str(name).endswith(".json"):
                continue
            url = name if storage.is_local(self.root_url) else f"{scheme}://{str(name).lstrip('/')}"
            try:
                records.append(storage.read_json(url, self.options))
            except (StorageError, ValueError):  # being rewritten: skip this one
                continue
        return records

    def read_complete(self, run_id: str) -> dict[str, Any] | None:
        url = self.run_url(run_id, "complete.json")
        return storage.read_json(url, self.options) if storage.exists(url, self.options) else None

    def phase_progress(self, claim: Mapping[str, Any], phase: str, total: int) -> PhaseProgress:
        run_id = str(claim["run_id"])
        times = self.markers(run_id, phase).done_times()
        done = {i for i in times if 0 <= i < total}
        landed = [t for t in times.values() if t is not None]
        return PhaseProgress(phase, total, done, max(landed) if landed else None,
                             self.shard_records(run_id, phase))

    def progress(self, claim: Mapping[str, Any]) -> list[PhaseProgress]:
        complete = self.read_complete(str(claim["run_id"]))
        out = []
        for name, total in claim.get("phases", []):
            if complete is not None:  # the record outlives the markers (label's clean removes them)
                out.append(PhaseProgress(name, int(total), set(range(int(total))),
                                         complete.get("time"), [], cleaned=True))
            else:
                out.append(self.phase_progress(claim, name, int(total)))
        return out

    def mark_complete_if_done(self, spec: RunSpec, info: Mapping[str, Any] | None = None) -> bool:
        """Write ``complete.json`` when every block of every phase is done; True if complete."""
        if self.read_complete(spec.run_id) is not None:
            return True
        for name, total in spec.phases:
            if len(self.markers(spec.run_id, name).missing(range(total))) > 0:
                return False
        self.write_complete(spec, info)
        return True

    def write_complete(self, spec: RunSpec, info: Mapping[str, Any] | None = None) -> None:
        record = {"run_id": spec.run_id, "task": spec.task, "time": time.time(),
                  "phases": [list(p) for p in spec.phases], **dict(info or {})}
        storage.write_json(self.run_url(spec.run_id, "complete.json"), record, self.options)
        log.info("%s: run %s is complete", self.shown, spec.run_id)
        self.remove_dead_temporaries()

    def remove_dead_temporaries(self) -> None:
        """Sweep the outputs and this record of the temporary files of writers killed
        mid-file (local file systems; see :func:`catena_mito.storage.remove_dead_temporaries`):
        their blocks were rewritten by a rerun, which is what let the run complete."""
        inside = any(_within(self.root_url, out) for out in self.outputs)
        for url in (*self.outputs, *(() if inside else (self.root_url,))):
            try:
                storage.remove_dead_temporaries(url)
            except OSError as e:  # the output is whole; leftovers only take space
                log.warning("could not sweep temporary files under %s: %s", storage.redact_url(url), e)


@dataclass
class PhaseProgress:
    """Blocks done of one phase of a run, and what its shards reported."""

    phase: str
    total: int
    done: set[int]
    last_landed: float | None
    shards: list[dict[str, Any]] = field(default_factory=list)
    cleaned: bool = False

    @property
    def missing(self) -> list[int]:
        return [i for i in range(self.total) if i not in self.done]

    def owners(self) -> list[str]:
        """Which shards own the missing blocks, with what they last reported."""
        missing = self.missing
        if not missing:
            return []
        from catena_mito.blockwise.geometry import shard_of

        counts = sorted({int(r["num_shards"]) for r in self.shards}) or [1]
        by_shard = {(int(r["shard_index"]), int(r["num_shards"])): r for r in self.shards}
        out = []
        for n in counts[-1:]:  # the most recent plan of shards is the largest count seen
            assignment = next((str(r["assignment"]) for r in self.shards
                               if int(r["num_shards"]) == n and r.get("assignment")), "round_robin")
            for k in sorted({shard_of(i, self.total, n, assignment) for i in missing}):
                record = by_shard.get((k, n))
                state = "never started" if record is None else f"{record['state']} {utc(record['time'])}"
                out.append(f"shard {k} of {n} ({state})")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "blocks_total": self.total, "blocks_done": len(self.done),
                "blocks_missing": len(self.missing), "missing_first": self.missing[:10],
                "incomplete_shards": self.owners(), "last_block_landed": utc(self.last_landed),
                "cleaned": self.cleaned,
                "shards": [{k: r.get(k) for k in ("shard_index", "num_shards", "state", "host", "pid")}
                           | {"time": utc(r.get("time"))} for r in self.shards]}


# --- single-process phases ------------------------------------------------------------------


class Lease:
    """An exclusive lease on a single-process phase (label merge/clean, ``--phase all``).

    Written to ``lease.json`` with a heartbeat. A process finding a lease of another
    owner takes it over at once when that owner is dead (same host, its pid gone or
    reused), and otherwise waits for it to be released or to go stale (no heartbeat for
    :data:`LEASE_STALE_SECONDS`, e.g. a killed pod on another node); a lease still alive
    after that wait is refused with a clear line. Object stores have no atomic
    create-if-absent, so two processes starting within the same moment are caught by
    re-reading the lease after a short pause.
    """

    def __init__(self, store: RunStore, run_id: str, phase: str, what: str):
        self.url = store.run_url(run_id, phase, "lease.json")
        self.options = store.options
        self.what = what
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            return storage.read_json(self.url, self.options) if storage.exists(self.url, self.options) else None
        except (StorageError, ValueError):
            return None

    def _payload(self) -> dict[str, Any]:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}

    def _write(self) -> None:
        storage.write_json(self.url, self._payload(), self.options)

    def _held(self, current: dict | None) -> bool:
        """Another live process holds ``current``."""
        if not current or current.get("token") == self.token:
            return False
        if time.time() - float(current.get("heartbeat", 0)) >= LEASE_STALE_SECONDS:
            return False
        if current.get("host") == socket.gethostname():
            pid = current.get("pid")
            if pid == os.getpid():
                return False  # our pid, another token: a previous process with this pid (a restarted container)
            try:
                if not storage.process_running(int(pid)):
                    return False  # died without releasing it (SIGKILL, OOM)
            except (TypeError, ValueError):
                pass  # no readable pid: only the heartbeat tells
        return True

    def _wait_until_free(self, current: dict | None) -> dict | None:
        from catena_mito.blockwise import signals

        deadline = time.monotonic() + LEASE_STALE_SECONDS + LEASE_HEARTBEAT_SECONDS
        logged = False
        while self._held(current) and time.monotonic() < deadline:
            if not logged:
                log.info("%s is held by %s pid %s; waiting for it to finish or go stale", self.what,
                         current.get("host"), current.get("pid"))
                logged = True
            signals.raise_if_requested("while waiting for a lease")
            time.sleep(1.0)
            current = self._read()
        return current

    def _refuse_if_held(self, current: dict | None) -> None:
        if self._held(current):
            raise PhaseError(
                f"{self.what} is already running in another process ({current.get('host')} pid "
                f"{current.get('pid')}, heartbeat {utc(current.get('heartbeat'))}); wait for it to finish "
                f"(a lease without heartbeat for {LEASE_STALE_SECONDS:g} s is taken over)")

    def _create_local(self) -> bool:
        """Create the lease file only if absent (atomic on POSIX); False if it exists."""
        path = storage.local_path(self.url)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(self._payload()))
        return True

    def __enter__(self) -> Lease:
        current = self._wait_until_free(self._read())
        self._refuse_if_held(current)
        if storage.is_local(self.url) and current is None and not self._create_local():
            # another process created it between our read and now
            self._refuse_if_held(self._read() or {"heartbeat": time.time(), "host": "?", "pid": "?"})
        self._write()  # ours now: created, or taken over from a dead or stale owner
        if not storage.is_local(self.url) and storage.url_scheme(self.url) != "memory":
            time.sleep(0.5)  # a concurrent starter's write lands in this pause: the last one wins
        current = self._read()
        if current is not None and current.get("token") != self.token:
            self._refuse_if_held(current)
        self._thread = threading.Thread(target=self._beat, name="catena-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(LEASE_HEARTBEAT_SECONDS):
            try:
                self._write()
            except StorageError as e:  # pragma: no cover - a store hiccup; the next beat retries
                log.warning("lease heartbeat failed: %s", e)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = self._read()
        if current is not None and current.get("token") == self.token:
            storage.remove(self.url, self.options, recursive=False)


# --- inputs ---------------------------------------------------------------------------------


def checkpoint_identity(data: bytes, model_type: str) -> dict[str, Any]:
    return {"kind": "checkpoint", "sha256": bytes_digest(data), "model_type": model_type}


def array_identity(arr: Any, url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The identity of a volume (see :mod:`catena_mito.blockwise.identity`)."""
    attrs = dict(arr.attrs)
    run = attrs.get(RUN_ATTR)
    if isinstance(run, Mapping) and run.get("run_id"):
        store = RunStore(resolve_url(url, str(run.get("record", ".catena"))), storage_options)
        complete = store.read_complete(str(run["run_id"])) is not None
        return {"kind": "catena", "task": run.get("task"), "run_id": run["run_id"], "complete": complete}
    attrs.pop(RUN_ATTR, None)
    return foreign_identity(arr.shape, arr.dtype, getattr(arr, "chunks", None), attrs)


def check_input(arr: Any, url: str, what: str, storage_options: Mapping[str, Any] | None = None,
                *, allow_incomplete: bool = False) -> dict[str, Any]:
    """The identity of input ``arr`` (at ``url``), refusing an incomplete or stale catena output.

    ``what`` names the input in messages (e.g. ``input_prediction_path 's3://…'``).
    Raises :class:`IncompleteInputError` (one line: the input, the run, how many blocks
    are missing and which shards own them) unless ``allow_incomplete``, which logs a
    warning instead.
    """
    ident = array_identity(arr, url, storage_options)
    if ident["kind"] != "catena":
        return ident
    run = dict(arr.attrs)[RUN_ATTR]
    store = RunStore(resolve_url(url, str(run.get("record", ".catena"))), storage_options)
    problem = _input_problem(store, ident, storage_options)
    if problem:
        if not allow_incomplete:
            raise IncompleteInputError(f"{what} {problem}; rerun what is missing, or pass --allow-incomplete")
        log.warning("%s %s; going on because of --allow-incomplete", what, problem)
    return ident


def _input_problem(store: RunStore, ident: Mapping[str, Any], storage_options: Any) -> str | None:
    claim = store.read_claim()
    run_id = ident["run_id"]
    if claim is None:
        return f"names run {run_id} of {ident['task']}, whose record at {store.shown} is missing"
    if claim.get("run_id") != run_id:
        return (f"was written by run {run_id} but run {claim.get('run_id')} now owns it "
                "(it is being recomputed with other settings)")
    if not ident["complete"]:
        parts = []
        for p in store.progress(claim):
            if p.missing:
                owners = ", ".join(p.owners())
                parts.append(f"{p.phase}: {len(p.missing)} of {p.total} blocks missing"
                             + (f", owned by {owners}" if owners else ""))
        return f"is incomplete (run {run_id} of {ident['task']}: {'; '.join(parts) or 'not finished'})"
    stale = stale_inputs(claim, storage_options)
    if stale:
        return f"is stale: run {run_id} of {ident['task']} was computed from {stale[0]}"
    return None


def stale_inputs(claim: Mapping[str, Any], storage_options: Any) -> list[str]:
    """Inputs of a run that are no longer what it read: a catena-mito output now written
    by another run (or incomplete), or a foreign volume whose metadata changed.
    Checkpoints are not re-read (their hash is in the run; a replaced file at the same
    URL is seen by the next predict, not by consumers of its output)."""
    out = []
    for name, recorded in (claim.get("description", {}).get("inputs", {}) or {}).items():
        if not isinstance(recorded, Mapping) or recorded.get("kind") not in ("catena", "foreign") or not recorded.get("url"):
            continue
        url = str(recorded["url"])
        try:
            now = array_identity(storage.open_array(url, storage_options), url, storage_options)
        except StorageError:
            out.append(f"{name} {url!r}, which no longer opens")
            continue
        was = {k: v for k, v in recorded.items() if k != "url"}
        if normalise(now) == normalise(was):
            continue
        if recorded.get("kind") == "catena" and now.get("kind") == "catena":
            out.append(f"{name} {url!r} as written by run {recorded.get('run_id')}, "
                       f"now run {now.get('run_id')}" + ("" if now.get("complete") else " (incomplete)"))
        else:
            out.append(f"{name} {url!r}, which has changed since ({'; '.join(differences(was, now)[:2])})")
    return out


def describe_inputs(inputs: Mapping[str, tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """``{name: identity + url}`` for a run description (URLs redacted)."""
    return {name: {**dict(ident), "url": normalise_url(storage.redact_url(url))} for name, (url, ident) in inputs.items()}
