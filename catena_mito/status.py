"""``catena-mito status URL``: which run produced an output, from what, and how far it got.

For an output array (a prediction or an instance volume), a dataset (every catena-mito
output inside it, and label runs whose output is not written yet) or a record folder:
the run that owns it, its inputs and settings, blocks done / total per phase, the shards
that still owe blocks (and what they last reported), when the last block landed, and
whether it is complete, incomplete or stale (an input changed since). ``--json`` prints
the same as JSON for scripts. Reads only; one listing per phase, never one request per
block.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from catena_mito import storage
from catena_mito.blockwise.identity import RUN_ATTR
from catena_mito.blockwise.runs import RunStore, resolve_url, stale_inputs, utc
from catena_mito.errors import DataError, StorageError


def _entry(output_url: str, store: RunStore, attrs_run: Mapping[str, Any] | None, options: Any) -> dict[str, Any]:
    claim = store.read_claim()
    entry: dict[str, Any] = {"output": storage.redact_url(output_url), "record": storage.redact_url(store.root_url)}
    if claim is None:
        entry.update(state="no run recorded", run_id=(attrs_run or {}).get("run_id"))
        return entry
    desc = claim.get("description", {})
    progress = store.progress(claim)
    complete = store.read_complete(str(claim["run_id"]))
    entry.update(
        task=claim.get("task"), run_id=claim.get("run_id"),
        inputs=desc.get("inputs", {}), settings=desc.get("settings", {}), plan=desc.get("plan", {}),
        phases=[p.as_dict() for p in progress],
        complete=complete is not None, completed_at=utc(complete.get("time")) if complete else None,
        last_block_landed=max((p.last_landed for p in progress if p.last_landed), default=None),
    )
    entry["last_block_landed"] = utc(entry["last_block_landed"])
    if attrs_run is not None and attrs_run.get("run_id") != claim.get("run_id"):
        entry["state"] = f"being replaced: the array holds run {attrs_run.get('run_id')}, run {claim.get('run_id')} owns it"
    elif complete is None:
        entry["state"] = "incomplete"
    else:
        stale = stale_inputs(claim, options)
        entry["stale_inputs"] = stale
        entry["state"] = "stale" if stale else "complete"
    return entry


def _array_entry(url: str, options: Any) -> dict[str, Any] | None:
    arr = storage.open_array(url, options)
    run = dict(arr.attrs).get(RUN_ATTR)
    if not isinstance(run, Mapping):
        return None
    store = RunStore(resolve_url(url, str(run.get("record", ".catena"))), options)
    return _entry(url, store, run, options)


def status(url: str, storage_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One entry per catena-mito output found at ``url`` (see the module docstring)."""
    options = dict(storage_options or {})
    if storage.exists(storage.join_url(url, "run.json"), options):  # a record folder
        return [_entry(url, RunStore(url, options), None, options)]
    if storage.array_exists(url, options):
        entry = _array_entry(url, options)
        if entry is None:
            raise DataError(f"{storage.redact_url(url)!r} was not written by catena-mito (no {RUN_ATTR} attribute)")
        return [entry]
    entries: list[dict[str, Any]] = []
    seen_records: set[str] = set()
    try:
        group = storage.open_group(url, mode="r", storage_options=options)
    except StorageError:
        group = None  # label's blocks phase writes records before any array exists
    for path, _node in sorted(_arrays(group) if group is not None else []):
        array_url = storage.join_url(url, path)
        entry = _array_entry(array_url, options)
        if entry is not None:
            entries.append(entry)
            seen_records.add(entry["record"])
        pyramid = storage.join_url(array_url, ".catena", "pyramid")
        if storage.exists(storage.join_url(pyramid, "run.json"), options):  # its coarser levels
            entries.append(_entry(f"{array_url} (pyramid levels)", RunStore(pyramid, options), None, options))
    # label runs whose output array is not there yet (blocks or merge still running)
    fs, root = storage.get_fs(storage.join_url(url, ".catena", "label"), options)
    try:
        found = fs.glob(root.rstrip("/") + "/**/run.json")
    except (FileNotFoundError, OSError):
        found = []
    for path in sorted(found):
        rel = str(path)[len(root.rstrip("/")) + 1 : -len("/run.json")]
        record_url = storage.join_url(url, ".catena", "label", rel)
        if storage.redact_url(record_url) not in seen_records:
            entries.append(_entry(storage.join_url(url, rel), RunStore(record_url, options), None, options))
    if not entries:
        what = "dataset" if group is not None else "catena-mito output, dataset or record folder"
        raise DataError(f"no catena-mito output found in {storage.redact_url(url)!r} (not a {what} with run records)")
    return entries


def _arrays(group: Any, prefix: str = "") -> list[tuple[str, Any]]:
    import warnings

    out = []
    with warnings.catch_warnings():  # zarr warns about our .catena record folders
        warnings.simplefilter("ignore")
        members = list(group.members())
    for name, node in members:
        path = f"{prefix}{name}"
        if hasattr(node, "members") and storage.level0_of(node) is not None:
            out.append((path, node))  # a volume (OME-NGFF multiscale group): its level 0 is the array
        elif hasattr(node, "members"):
            out.extend(_arrays(node, path + "/"))
        else:
            out.append((path, node))
    return out


def format_status(entries: list[dict[str, Any]]) -> str:
    lines = []
    for e in entries:
        lines.append(f"{e['output']}: {e['state']}" + (f" (run {e['run_id']} of {e['task']})" if e.get("task") else ""))
        for name, ident in (e.get("inputs") or {}).items():
            kind = ident.get("kind")
            what = (f"run {ident.get('run_id')} of {ident.get('task')}" + ("" if ident.get("complete") else ", incomplete when read")
                    if kind == "catena" else ident.get("sha256") if kind == "checkpoint"
                    else f"{ident.get('shape')} {ident.get('dtype')}")
            lines.append(f"  input {name:<10} {ident.get('url')}  ({what})")
        if e.get("settings"):
            lines.append("  settings   " + ", ".join(f"{k}={json.dumps(v)}" for k, v in e["settings"].items()))
        for p in e.get("phases", []):
            line = f"  {p['phase']:<10} {p['blocks_done']}/{p['blocks_total']} blocks"
            if p["cleaned"]:
                line += " (intermediate files cleaned)"
            if p["blocks_missing"]:
                line += f", {p['blocks_missing']} missing (first {p['missing_first']})"
                if p["incomplete_shards"]:
                    line += "; owed by " + ", ".join(p["incomplete_shards"])
            if p["last_block_landed"]:
                line += f"; last block {p['last_block_landed']}"
            lines.append(line)
        if e.get("completed_at"):
            lines.append(f"  completed  {e['completed_at']}")
        for s in e.get("stale_inputs") or []:
            lines.append(f"  stale      computed from {s}")
    return "\n".join(lines)
