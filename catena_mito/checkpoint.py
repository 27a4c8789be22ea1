"""Checkpoints: one ``torch.save`` file per checkpoint, read back with ``weights_only=True``.

A checkpoint is a dict (format version 1)::

    format_version  1
    catena_version  the catena_mito version that wrote it
    model_type      a key of catena_mito.models.MODEL_TYPES
    model_params    complete hyper-parameters (defaults resolved), so predict needs nothing else
    state_dict      the model's state dict
    optimizer       optimizer state dict, or None
    scheduler       LR-scheduler state dict, or None
    epoch           int
    best_metric     float or None
    config          the resolved training config as a plain dict (secrets already redacted)
    rng             optional: torch / CUDA / numpy / python RNG states, as tensors and ints
    targets         optional: what the model predicts, one name per target in channel order
                    (catena_mito.targets); missing in older checkpoints, which are
                    single-target foreground models (2-channel softmax)
    contour_width   optional: the contour target's width (voxels at the training
                    resolution), with the ``contour`` target

Everything in it is a plain type (dict, list, tuple, str, int, float, bool, None) or a
tensor, because :func:`load_checkpoint` never unpickles anything else: a checkpoint that
would need arbitrary objects (and could therefore run code) is refused, not "loaded anyway".
:func:`save_checkpoint` checks this before writing, so an unloadable file is never written.

Paths are fsspec URLs (local path, ``file://``, ``memory://``, ``s3://``). Writes are
atomic: the bytes go to a temporary name next to the target and are renamed (local) or
moved (remote stores) into place, so a killed writer never leaves a truncated file under
the final name.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import pickle
import random
import re
import tempfile
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import nn

from catena_mito import __version__
from catena_mito.errors import CatenaError, CheckpointError, ConfigError, StorageError
from catena_mito.storage import redact_url, resolve_storage_options

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "format_version",
    "catena_version",
    "model_type",
    "model_params",
    "state_dict",
    "optimizer",
    "scheduler",
    "epoch",
    "best_metric",
    "config",
)
_CHUNK = 8 * 1024 * 1024
_NAMES_SHOWN = 5


# --------------------------------------------------------------------------- payload


def make_payload(
    model_type: str,
    model_params: Mapping[str, Any] | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    epoch: int = 0,
    best_metric: float | None = None,
    config: Mapping[str, Any] | None = None,
    rng: Mapping[str, Any] | None = None,
    targets: Sequence[str] | None = None,
    contour_width: int | None = None,
) -> dict[str, Any]:
    """Assemble a checkpoint dict; ``model_params`` are completed with the model's defaults.

    ``best_metric`` is converted to a Python float (numpy scalars would not load under
    ``weights_only``). ``config`` must already be a plain dict without secrets.
    ``targets`` (default: the foreground alone) are recorded in channel order, with
    ``contour_width`` when they include the contour.

    Raises:
        CheckpointError: the model's output channels do not fit ``targets``, or the contour
        target comes without its width.
    """
    from catena_mito.models import resolve_model_params
    from catena_mito.targets import CONTOUR, DEFAULT_TARGETS, validate_targets

    payload: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "catena_version": __version__,
        "model_type": model_type,
        "model_params": resolve_model_params(model_type, model_params),
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "best_metric": None if best_metric is None else float(best_metric),
        "config": dict(config) if config is not None else {},
    }
    if rng is not None:
        payload["rng"] = dict(rng)
    try:
        names = validate_targets(targets if targets is not None else DEFAULT_TARGETS)
    except ConfigError as e:
        raise CheckpointError(f"cannot save checkpoint: {e}") from e
    payload["targets"] = list(names)
    if CONTOUR in names:
        if contour_width is None:
            raise CheckpointError("cannot save checkpoint: the contour target needs its contour_width")
        payload["contour_width"] = int(contour_width)
    _check_channels(payload, "cannot save checkpoint")
    return payload


def _check_channels(ckpt: Mapping[str, Any], what: str) -> None:
    """The model's ``out_channels`` must fit the checkpoint's targets (2 or 1 for one)."""
    from catena_mito.targets import checkpoint_targets, out_channels

    targets = checkpoint_targets(ckpt)
    channels = ckpt["model_params"].get("out_channels")
    fits = channels in (1, 2) if len(targets) == 1 else channels == out_channels(targets)
    if channels is not None and not fits:
        raise CheckpointError(
            f"{what}: the model has {channels} output channels, which does not fit targets "
            f"{list(targets)} (expected {out_channels(targets)})"
        )


def _type_name(value: Any) -> str:
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def _check_plain(value: Any, where: str) -> None:
    """Raise CheckpointError at the first value that ``weights_only`` loading would refuse."""
    if type(value) in _SCALARS or isinstance(value, (torch.Tensor, torch.dtype, torch.device)):
        return
    if type(value) is torch.Size:
        return
    if type(value) in (dict, collections.OrderedDict):
        for key, item in value.items():
            if type(key) not in _SCALARS:
                raise CheckpointError(
                    f"cannot save checkpoint: a key of {where} has type {_type_name(key)}; "
                    "keys must be str/int/float/bool"
                )
            _check_plain(item, f"{where}[{key!r}]")
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"cannot save checkpoint: {where} has type {_type_name(value)}, which weights_only "
        "loading refuses; convert it to a plain bool/int/float/str/list/dict or a tensor"
    )


def _validate_payload(payload: Any, source: str) -> dict[str, Any]:
    """Check the keys, the format version and the model type; return the payload."""
    from catena_mito.models import MODEL_TYPES

    if not isinstance(payload, Mapping):
        raise CheckpointError(
            f"checkpoint {source} holds a {_type_name(payload)}, not a catena-mito checkpoint dict"
        )
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        hint = ""
        if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            hint = " (it looks like a bare model state_dict, not a catena-mito checkpoint)"
        raise CheckpointError(
            f"checkpoint {source} is missing required keys: {', '.join(missing)}{hint}"
        )
    version = payload["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {source} has format_version {version!r}; this catena-mito "
            f"({__version__}) reads format_version <= {FORMAT_VERSION}"
        )
    model_type = payload["model_type"]
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"checkpoint {source} has unknown model_type {model_type!r}; "
            f"expected one of: {', '.join(MODEL_TYPES)}"
        )
    for key in ("model_params", "state_dict"):
        if not isinstance(payload[key], Mapping):
            raise CheckpointError(
                f"checkpoint {source}: {key} is a {_type_name(payload[key])}, expected a dict"
            )
    return dict(payload)


# --------------------------------------------------------------------------- save / load


def _copy_to(fh: IO[bytes], data: bytes) -> None:
    """Write ``data`` in chunks (a separate function so tests can simulate a crash mid-write)."""
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        fh.write(view[start : start + _CHUNK])


def save_checkpoint(url: str, payload: Mapping[str, Any], storage_options: dict | None = None) -> None:
    """Write ``payload`` to ``url`` atomically (temporary name, then rename/move).

    The payload is validated (required keys, plain types only) and serialised in memory
    before storage is touched, so an invalid payload writes nothing. Parent directories of
    local paths are created. An existing checkpoint under ``url`` is replaced only once the
    new one is complete.

    Raises:
        CheckpointError: the payload is incomplete or holds objects ``weights_only`` refuses.
        StorageError: the URL cannot be written.
    """
    shown = redact_url(url)  # never a user:password@ part in messages
    _validate_payload(payload, shown)
    _check_plain(payload, "payload")
    buffer = io.BytesIO()
    torch.save(dict(payload), buffer)
    data = buffer.getvalue()

    try:
        fs, path = fsspec.core.url_to_fs(url, **resolve_storage_options(url, storage_options))
    except (ValueError, ImportError) as e:
        raise StorageError(f"cannot open checkpoint URL {shown}: {e}") from e
    try:
        if isinstance(fs, LocalFileSystem):
            _save_local(path, data)
        else:
            _save_remote(fs, path, data)
    except OSError as e:
        raise StorageError(f"cannot write checkpoint {shown}: {e}") from e
    log.info("saved checkpoint %s (%d bytes)", shown, len(data))


def _save_local(path: str, data: bytes) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    # Same directory as the target, so os.replace is an atomic rename on one filesystem.
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            _copy_to(fh, data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave the temporary file behind.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save_remote(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    # Object stores publish an object only when its upload completes, and the final key is
    # written by a server-side move of a complete temporary object.
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open(tmp, "wb") as fh:
            _copy_to(fh, data)
        fs.mv(tmp, path)
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:  # noqa: BLE001 - best effort; the original error matters more
            log.warning("could not remove temporary checkpoint %s", tmp)
        raise


def _weights_only_reason(message: str) -> str:
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", message, re.S)
    return " ".join(match.group(1).split()) if match else "unsupported object"


def load_checkpoint(
    url: str, storage_options: dict | None = None, map_location: Any = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(..., weights_only=True)`` and validate it.

    Raises:
        CheckpointError: (one line) the file is missing, truncated or corrupt; it contains
        code or objects that ``weights_only`` loading refuses (never retried unsafely);
        required keys are missing; the format version or ``model_type`` is unknown.
    """
    return _validate_payload(read_weights_file(url, storage_options, map_location), redact_url(url))


def read_weights_file(url: str, storage_options: dict | None = None, map_location: Any = "cpu") -> Any:
    """Whatever ``torch.load(..., weights_only=True)`` reads from ``url``, unvalidated: a
    catena-mito checkpoint, a bare state dict or another tool's checkpoint dict.

    Raises:
        CheckpointError: as :func:`load_checkpoint`, except for the checks of the content.
    """
    shown = redact_url(url)  # never a user:password@ part in messages
    try:
        fs, path = fsspec.core.url_to_fs(url, **resolve_storage_options(url, storage_options))
        if not fs.exists(path):
            raise CheckpointError(f"checkpoint not found: {shown}")
        with fs.open(path, "rb") as fh:
            data = fh.read()
    except CatenaError:
        raise
    except (OSError, ValueError, ImportError) as e:
        raise CheckpointError(f"cannot read checkpoint {shown}: {e}") from e
    if not data:
        raise CheckpointError(f"checkpoint {shown} is empty (truncated or corrupt)")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols before refusing foreign pickles; the error says it.
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own format is a zip archive, a raw pickle starts with the PROTO opcode;
        # anything else refused by the weights-only unpickler is just not a checkpoint.
        looks_like_pickle = data[:2] == b"PK" or data[:1] == b"\x80"
        if "Weights only load failed" in str(e) and looks_like_pickle:
            raise CheckpointError(
                f"checkpoint {shown} contains code or Python objects that weights_only loading "
                f"refuses ({_weights_only_reason(str(e))}); it was not loaded"
            ) from e
        raise CheckpointError(
            f"checkpoint {shown} is truncated or corrupt (not a PyTorch zip archive or pickle)"
        ) from e
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/EOFError/KeyError/... here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {shown} is truncated or corrupt ({type(e).__name__}: {first})"
        ) from e
    return payload


# --------------------------------------------------------------------------- weights


@dataclass
class LoadReport:
    """What :func:`load_weights_into` loaded (tensor names, the model's) and what it left out.

    ``layout`` says where the state dict was found (``"state_dict"``, ``"model"``,
    ``"bare state dict"`` …) and ``renamed`` which name prefix was removed (or ``None``).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    layout: str = "state_dict"
    renamed: str | None = None

    def describe(self, source: str) -> str:
        """One log block: the counts on the first line, the names left out below it."""
        how = self.layout + (f", prefix {self.renamed!r} removed" if self.renamed else "")
        lines = [f"{source} ({how}): {len(self.loaded)} tensors loaded, {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected"]
        if self.missing:
            lines.append(f"  missing (keep their initial values): {_few(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected (ignored): {_few(self.unexpected)}")
        return "\n".join(lines)


def _few(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    return f"{shown}, … ({len(names)} in all)" if len(names) > _NAMES_SHOWN else shown


#: Keys under which checkpoints of other tools keep the model's state dict, tried in this
#: order: ours and PyTorch Lightning's, then common training-script layouts, nnU-Net's.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "network_weights", "module")
#: Name prefixes other tools add: DataParallel/DDP, Lightning modules, torch.compile.
STRIP_PREFIXES = ("module.", "model.", "net.", "network.", "_orig_mod.")


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def find_state_dict(obj: Any) -> tuple[Mapping[str, Any], str]:
    """``(state_dict, layout)`` of a loaded checkpoint of any common layout.

    A bare state dict (tensors by name), or a dict holding one under a key of
    :data:`STATE_DICT_KEYS`, up to two levels deep (``{"model": {"state_dict": …}}``).

    Raises:
        CheckpointError: naming the top-level keys when none of them holds a state dict.
    """
    if _is_state_dict(obj):
        return obj, "bare state dict"
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {_type_name(obj)}, not a state dict or a dict with one")
    for key in STATE_DICT_KEYS:
        inner = obj.get(key)
        if _is_state_dict(inner):
            return inner, key
        if isinstance(inner, Mapping):
            for key2 in STATE_DICT_KEYS:
                if _is_state_dict(inner.get(key2)):
                    return inner[key2], f"{key}.{key2}"
    if "state_dict" in obj and not isinstance(obj["state_dict"], Mapping):
        raise CheckpointError(f"checkpoint state_dict is a {_type_name(obj['state_dict'])}, expected a dict")
    keys = ", ".join(repr(k) for k in list(obj)[:8])
    raise CheckpointError(
        f"checkpoint has no state dict (top-level keys: {keys}); expected a bare state dict or one "
        f"under {', '.join(repr(k) for k in STATE_DICT_KEYS)}"
    )


def _match_names(state: Mapping[str, Any], own: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """``state`` with the one prefix of :data:`STRIP_PREFIXES` removed (repeatedly, as
    ``module.model.``) that makes the most names match ``own``; unchanged if none helps."""
    best, best_prefix = dict(state), None
    best_hits = sum(k in own for k in best)
    for prefix in STRIP_PREFIXES:
        renamed = {}
        for k, v in state.items():
            while k.startswith(prefix):
                k = k[len(prefix):]
            renamed[k] = v
        hits = sum(k in own for k in renamed)
        if hits > best_hits and len(renamed) == len(state):  # never merge two tensors into one
            best, best_prefix, best_hits = renamed, prefix, hits
    return best, best_prefix


def load_weights_into(model: nn.Module, ckpt: Mapping[str, Any], *, strict: bool = True) -> LoadReport:
    """Copy the checkpoint's weights into ``model``, failing loudly on any mismatch.

    ``ckpt`` is any layout :func:`find_state_dict` knows; names carrying another tool's
    prefix (``module.`` …) are matched without it. ``strict=True``: every tensor name and
    shape must match exactly. ``strict=False``: missing and unexpected names are allowed
    and logged as a warning, but shape mismatches are still errors and at least one tensor
    must load — never a silent partial load.

    Raises:
        CheckpointError: naming a few missing / unexpected / mismatched tensors.
    """
    raw, layout = find_state_dict(ckpt)
    own = model.state_dict()
    state, prefix = _match_names(raw, own)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {_few(mismatched)}")
    if strict and missing:
        problems.append(f"missing in checkpoint: {_few(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected in checkpoint: {_few(unexpected)}")
    loaded = [k for k in own if k in state]
    if not loaded:
        problems.append("no tensor name of the model is in the checkpoint")
    if problems:
        hint = "; set model_loc_strict: false to load a part" if strict and not mismatched and loaded else ""
        raise CheckpointError(
            f"checkpoint weights do not fit {type(model).__name__}: " + "; ".join(problems) + hint
        )
    report = LoadReport(loaded=loaded, missing=missing, unexpected=unexpected, layout=layout, renamed=prefix)
    if missing or unexpected:
        log.warning("partial weight load (strict=False): %s", report.describe("checkpoint"))
    model.load_state_dict({k: state[k] for k in loaded}, strict=strict)
    return report


def load_pretrained(
    model: nn.Module,
    url: str,
    storage_options: dict | None = None,
    *,
    model_type: str | None = None,
    targets: Sequence[str] | None = None,
    strict: bool = True,
    field_name: str = "model_loc",
) -> LoadReport:
    """Load the weights of ``url`` into ``model`` for fine-tuning, and log what loaded.

    ``url`` may hold a catena-mito checkpoint (its ``model_type`` must then be
    ``model_type``), a bare state dict, or another tool's checkpoint (see
    :func:`find_state_dict`); always read with ``weights_only=True``. The log block names
    the layout, the counts of loaded / missing / unexpected tensors and the first names
    of the last two.

    Raises:
        CheckpointError: prefixed with ``field_name`` and the URL: unreadable or unsafe
        file, another model type, or weights that do not fit (see :func:`load_weights_into`).
    """
    shown = redact_url(url)
    try:
        payload = read_weights_file(url, storage_options)
        if isinstance(payload, Mapping) and "format_version" in payload and "model_type" in payload:
            payload = _validate_payload(payload, shown)  # ours: all of its checks
            if model_type is not None and payload["model_type"] != model_type:
                raise CheckpointError(
                    f"{shown} holds a {payload['model_type']!r} model but model_type is {model_type!r}"
                )
            # Other targets mean another output layer: say so, not "shape mismatch" of a tensor.
            if strict and targets is not None:
                from catena_mito.targets import checkpoint_targets

                if list(checkpoint_targets(payload)) != list(targets):
                    raise CheckpointError(
                        f"{shown} was trained for targets {list(checkpoint_targets(payload))} but "
                        f"targets is {list(targets)} (model_loc_strict: false loads the layers that fit)"
                    )
        report = load_weights_into(model, payload, strict=strict)
    except CheckpointError as e:
        message = str(e) if shown in str(e) else f"{shown}: {e}"
        raise CheckpointError(f"{field_name}: {message}") from e
    log.info("%s", report.describe(f"{field_name} {shown}"))
    return report


def build_model_from_checkpoint(ckpt: Mapping[str, Any]) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (strictly).

    The model is returned in PyTorch's default (training) mode; call ``.eval()`` to predict.

    Raises:
        CheckpointError: the hyper-parameters are invalid or the weights do not match.
    """
    from catena_mito.errors import ConfigError
    from catena_mito.models import build_model

    for key in ("model_type", "model_params", "state_dict"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint is missing required key: {key}")
    model_type = ckpt["model_type"]
    # Before building: a checkpoint whose targets and channels disagree would predict the
    # wrong thing under the right name.
    _check_channels(ckpt, "checkpoint is inconsistent")
    try:
        model = build_model(model_type, **dict(ckpt["model_params"]))
    except ConfigError as e:
        raise CheckpointError(f"checkpoint model_type/model_params are invalid: {e}") from e
    load_weights_into(model, ckpt, strict=True)
    return model


# --------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy-global and python ``random`` states, ``weights_only``-safe.

    numpy's and python's Mersenne-Twister keys are stored as int64 tensors, not numpy arrays
    or tuples of Python objects, so the checkpoint loads with ``weights_only=True``.
    """
    np_state = np.random.get_state(legacy=False)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "bit_generator": str(np_state["bit_generator"]),
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"]).astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore states from :func:`capture_rng_state` (CUDA only when devices match).

    Raises:
        CheckpointError: the state is malformed.
    """
    try:
        torch.set_rng_state(state["torch"].to(device="cpu", dtype=torch.uint8))
        npy = state["numpy"]
        np.random.set_state(
            (
                npy["bit_generator"],
                npy["key"].cpu().numpy().astype(np.uint32),
                int(npy["pos"]),
                int(npy["has_gauss"]),
                float(npy["gauss"]),
            )
        )
        py = state["python"]
        random.setstate(
            (int(py["version"]), tuple(int(i) for i in py["internal"].tolist()), py["gauss_next"])
        )
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint rng state is malformed: {type(e).__name__}: {e}") from e
    cuda = list(state.get("cuda") or [])
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all([t.to(device="cpu", dtype=torch.uint8) for t in cuda])
        else:
            # Resuming on different hardware: training continues, but not bit-for-bit.
            log.warning(
                "checkpoint has CUDA RNG states for %d device(s) but %d are visible; "
                "CUDA random numbers will not repeat exactly",
                len(cuda), torch.cuda.device_count() if torch.cuda.is_available() else 0,
            )
