"""Models that travel: a checkpoint as TorchScript (and ONNX) with a model card.

``catena-mito export-model CKPT OUT`` writes, into the folder ``OUT`` (any fsspec URL)::

    model.pt          TorchScript (``torch.jit.trace`` of the eval-mode model); the model
                      card is embedded (``model_card.json`` extra file), so this one file is
                      all ``predict`` (``model_path: OUT/model.pt``) or another tool needs
    model.onnx        with ``onnx=True`` (needs the ``onnx`` package: ``pip install onnx``)
    model_card.json   the card (see :func:`model_card`)
    README.md         the card for people

Both backbones trace to a graph without Python control flow that depends on values, so
the traced model holds for any batch size and any patch the backbone accepts; its input
is ``(N, 1, z, y, x)`` float32 preprocessed as the card says, its output the logits
``(N, C, z, y, x)``. Probabilities follow :func:`catena_mito.targets.probabilities`.

Every export is checked before anything is written: the exported model and the
checkpoint's model predict two random patches, and the largest difference of their
probabilities must stay within :data:`TORCHSCRIPT_TOLERANCE` (TorchScript, measured 0:
bitwise equal on CPU) and, for ONNX under ONNX Runtime (when installed, which rounds in
another order), :data:`ONNX_TOLERANCE` plus twice PyTorch's own float32 error on those
patches (float32 against float64: about 1e-6 for a well-scaled model, but 5e-4 for an
untrained rs_unet whose logits reach 900). The measured differences go into the card.

Loading an exported model runs TorchScript, which is not restricted the way
``torch.load(weights_only=True)`` is: load exported models you trust, like code.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from catena_mito import __version__, storage
from catena_mito.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

CARD_NAME = "model_card.json"
TORCHSCRIPT_NAME = "model.pt"
ONNX_NAME = "model.onnx"
README_NAME = "README.md"
CARD_FORMAT = "catena-mito exported model"
CARD_VERSION = 1
#: Largest |difference| of probabilities an export may show against its checkpoint.
TORCHSCRIPT_TOLERANCE = 1e-6
ONNX_TOLERANCE = 1e-4
#: The key under which :func:`load_model_source` hands predict the TorchScript bytes.
TORCHSCRIPT_KEY = "torchscript"
_ONNX_OPSET = 17


# --- the card -------------------------------------------------------------------------------


def _validation_metrics(ckpt: Mapping[str, Any], ckpt_url: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Best pooled validation IoU from the checkpoint, plus the last evaluation at or before
    its epoch from the run's ``metrics.jsonl`` beside it (when there is one)."""
    out: dict[str, Any] = {"best_val_iou": ckpt.get("best_metric"), "epoch": ckpt.get("epoch")}
    metrics_url = ckpt_url.rstrip("/").rsplit("/", 1)[0] + "/metrics.jsonl" if "/" in ckpt_url else "metrics.jsonl"
    try:
        if not storage.exists(metrics_url, options):
            return out
        lines = storage.read_bytes(metrics_url, options).decode().splitlines()
    except storage.StorageError:
        return out
    last = None
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "val_iou" in record and int(record.get("epoch", 0)) <= int(ckpt.get("epoch") or 0):
            last = record
    if last is not None:
        out["at_epoch"] = {k: v for k, v in last.items() if k.startswith("val_") or k == "epoch"}
    return out


def model_card(ckpt: Mapping[str, Any], ckpt_url: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What another lab or tool needs to run the model right (a JSON-able dict).

    Model type and hyper-parameters, targets and output channels, the input it expects
    (patch size and stride in voxels, the resolution in nm it was trained at, CLAHE and
    normalisation), the training and validation data names, validation metrics, the
    catena-mito versions, and ``training_config`` (the resolved training config, secrets
    already redacted), from which ``predict`` takes its defaults as from a checkpoint.
    """
    from catena_mito.targets import checkpoint_targets, out_channels

    train = dict(ckpt.get("config") or {})
    targets = list(checkpoint_targets(ckpt))
    channels = int(dict(ckpt["model_params"]).get("out_channels", out_channels(targets)))
    probabilities = (
        "softmax over the 2 channels; channel 1 is the foreground probability"
        if len(targets) == 1 and channels == 2
        else "sigmoid of each channel, one channel per target in the order of `targets`"
    )
    target_res = train.get("target_res") or train.get("original_res")
    return {
        "format": CARD_FORMAT,
        "format_version": CARD_VERSION,
        "catena_version": __version__,
        "trained_with_catena_version": ckpt.get("catena_version"),
        "source_checkpoint": storage.redact_url(ckpt_url),
        "model_type": ckpt["model_type"],
        "model_params": dict(ckpt["model_params"]),
        "label_type": train.get("label_type", "mito"),
        "targets": targets,
        "input": {
            "axes": "NCZYX", "channels": 1, "dtype": "float32",
            "patch_size": train.get("patch_size"), "stride": train.get("stride"),
        },
        "output": {"axes": "NCZYX", "kind": "logits", "channels": channels, "probabilities": probabilities},
        "resolution_nm": {"training": target_res, "original_res": train.get("original_res"),
                          "target_res": train.get("target_res")},
        "preprocessing": {
            "clahe": bool(train.get("clahe", False)),
            "clahe_method": "skimage.exposure.equalize_adapthist (defaults) per whole z slice, output in [0, 1]",
            "normalization": "without CLAHE, by dtype: uint8 / 255, other unsigned / dtype max, signed "
                             "(x - min) / (max - min), float unchanged; never by data statistics",
            "resampling": "original_res -> target_res, linear with a Gaussian low-pass (sigma = (factor - 1) / 2 "
                          "input voxels) on down-sampled axes; see catena_mito.preprocess",
        },
        "training_data": list(train.get("train_zarr_dirs") or []),
        "validation_data": list(train.get("test_zarr_dirs") or []),
        "validation_metrics": _validation_metrics(ckpt, ckpt_url, options),
        "training_config": train,
    }


def card_markdown(card: Mapping[str, Any]) -> str:
    """The card as a short Markdown page."""
    inp, res, pre = card["input"], card["resolution_nm"], card["preprocessing"]
    metrics = card["validation_metrics"]
    lines = [
        f"# {card['model_type']} mitochondria model ({', '.join(card['targets'])})",
        "",
        f"Exported by catena-mito {card['catena_version']} from `{card['source_checkpoint']}` "
        f"(trained with catena-mito {card['trained_with_catena_version']}).",
        "",
        f"- **Input**: `(N, 1, z, y, x)` float32, patch {inp['patch_size']} voxels (stride {inp['stride']}), "
        f"at {res['training']} nm (z, y, x).",
        f"- **Preprocessing**: CLAHE {'on' if pre['clahe'] else 'off'} ({pre['clahe_method']}); "
        f"normalisation {pre['normalization']}; resampling {pre['resampling']}.",
        f"- **Output**: logits `(N, {card['output']['channels']}, z, y, x)`; probabilities: {card['output']['probabilities']}.",
        f"- **Training data**: {', '.join(card['training_data']) or 'not recorded'}.",
        f"- **Validation data**: {', '.join(card['validation_data']) or 'none'}; best pooled IoU "
        f"{metrics.get('best_val_iou')} (checkpoint epoch {metrics.get('epoch')}).",
        "",
        "Files: `model.pt` (TorchScript: `torch.jit.load`; catena-mito `predict` takes it as "
        "`model_path`), `model.onnx` when exported, `model_card.json` (all of the above and the "
        "training config).",
    ]
    check = card.get("verification")
    if check:
        lines += ["", f"Checked against the checkpoint: max |Δ probability| {check}."]
    return "\n".join(lines) + "\n"


# --- export ---------------------------------------------------------------------------------


def _probabilities(model: Any, x: Any, targets: list[str]) -> np.ndarray:
    import torch

    from catena_mito.targets import probabilities

    with torch.inference_mode():
        return probabilities(model(x).float(), targets).cpu().numpy()


def _example(patch: list[int]) -> Any:
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.rand((2, 1, *patch), generator=gen, dtype=torch.float32)


def _onnx_bytes(model: Any, x: Any) -> bytes:
    import torch

    try:
        import onnx  # noqa: F401 - the exporter needs it; say so before trying
    except ImportError as e:
        raise ConfigError("--onnx needs the onnx package: pip install onnx (and onnxruntime to check it)") from e
    buffer = io.BytesIO()
    axes = {0: "n", 2: "z", 3: "y", 4: "x"}
    try:
        # The TorchScript-based exporter: it needs only `onnx`, not onnxscript.
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["raw"], output_names=["logits"],
                          dynamic_axes={"raw": axes, "logits": axes}, opset_version=_ONNX_OPSET)
    except Exception as e:  # noqa: BLE001 - any exporter failure is one line for the user
        raise CheckpointError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    return buffer.getvalue()


def _onnx_difference(data: bytes, x: Any, reference: np.ndarray, targets: list[str]) -> float | None:
    """Max |Δ probability| of the ONNX model under ONNX Runtime, or None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        log.warning("onnxruntime is not installed: the ONNX model is written but not checked")
        return None
    import torch

    from catena_mito.targets import probabilities

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(None, {"raw": x.numpy()})[0])
    return float(np.abs(probabilities(logits, targets).numpy() - reference).max())


def _float32_error(model: Any, x: Any, reference: np.ndarray, targets: list[str]) -> float:
    """Max |Δ probability| of PyTorch float32 against the same model in float64."""
    import copy

    import torch

    wide = copy.deepcopy(model).double()
    return float(np.abs(_probabilities(wide, x.to(torch.float64), targets) - reference).max())


def export_model(
    ckpt_url: str,
    out_url: str,
    *,
    onnx: bool = False,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Export the checkpoint at ``ckpt_url`` into the folder ``out_url``; returns the card.

    Raises:
        ConfigError: ``out_url`` already holds an export (without ``overwrite``), no patch
        size in the checkpoint, or ``onnx`` without the onnx package.
        CheckpointError: unreadable checkpoint, a failed export, or an exported model whose
        probabilities differ from the checkpoint's beyond the tolerance. Nothing is written
        then.
    """
    import torch

    from catena_mito.checkpoint import build_model_from_checkpoint, load_checkpoint

    card_url = storage.join_url(out_url, CARD_NAME)
    if storage.exists(card_url, storage_options) and not overwrite:
        raise ConfigError(f"{storage.redact_url(out_url)!r} already holds an exported model; pass --overwrite to replace it")
    ckpt = load_checkpoint(ckpt_url, storage_options, map_location="cpu")
    card = model_card(ckpt, ckpt_url, storage_options)
    patch = card["input"]["patch_size"]
    if not patch:
        raise ConfigError(f"checkpoint {storage.redact_url(ckpt_url)!r} records no training patch_size; cannot trace it")
    patch = [int(p) for p in (patch if isinstance(patch, (list, tuple)) else [patch] * 3)]
    model = build_model_from_checkpoint(ckpt).eval()
    targets = card["targets"]
    x = _example(patch)
    reference = _probabilities(model, x, targets)
    with torch.no_grad(), warnings.catch_warnings():
        # The backbones' shape checks become constants in the trace (TracerWarning): they
        # guard patch sizes check_patch_size already enforces, so the warning says nothing.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # Not torch.jit.freeze: folding batch norm into the convolutions would change values.
        traced = torch.jit.trace(model, x, check_trace=False)
    ts_diff = float(np.abs(_probabilities(traced, x, targets) - reference).max())
    if ts_diff > TORCHSCRIPT_TOLERANCE:
        raise CheckpointError(f"the TorchScript export differs from the checkpoint by {ts_diff:.3g} (> {TORCHSCRIPT_TOLERANCE})")
    verification: dict[str, Any] = {"torchscript": ts_diff, "torchscript_tolerance": TORCHSCRIPT_TOLERANCE,
                                    "inputs": f"2 uniform random patches {patch}, seed 0, CPU float32"}
    onnx_data = None
    if onnx:
        onnx_data = _onnx_bytes(model, x)
        onnx_diff = _onnx_difference(onnx_data, x, reference, targets)
        # Another runtime sums in another order: it may differ from PyTorch by about as much
        # as float32 itself is off, which for badly scaled logits exceeds ONNX_TOLERANCE.
        fp32_error = _float32_error(model, x, reference, targets)
        allowed = ONNX_TOLERANCE + 2.0 * fp32_error
        if onnx_diff is not None and onnx_diff > allowed:
            raise CheckpointError(
                f"the ONNX export differs from the checkpoint by {onnx_diff:.3g} (> {allowed:.3g}: "
                f"{ONNX_TOLERANCE:g} + twice PyTorch's own float32 error {fp32_error:.3g})"
            )
        verification.update(onnx=onnx_diff, onnx_tolerance=allowed, float32_error=fp32_error)
    card["verification"] = verification
    card["files"] = [TORCHSCRIPT_NAME] + ([ONNX_NAME] if onnx else []) + [CARD_NAME, README_NAME]
    card_bytes = json.dumps(card, indent=1, sort_keys=True).encode()
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={CARD_NAME: card_bytes})
    # The card last: a folder with a card is a complete export.
    storage.write_bytes(storage.join_url(out_url, TORCHSCRIPT_NAME), buffer.getvalue(), storage_options)
    if onnx_data is not None:
        storage.write_bytes(storage.join_url(out_url, ONNX_NAME), onnx_data, storage_options)
    storage.write_bytes(storage.join_url(out_url, README_NAME), card_markdown(card).encode(), storage_options)
    storage.write_bytes(card_url, card_bytes, storage_options)
    return card


# --- loading (predict) ----------------------------------------------------------------------


def is_torchscript(data: bytes) -> bool:
    """Whether ``data`` is a TorchScript archive (it holds compiled ``code/``; a
    ``torch.save`` checkpoint holds only pickled data)."""
    if data[:2] != b"PK":
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return any("/code/" in name for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def read_exported(data: bytes, shown: str) -> dict[str, Any]:
    """The checkpoint-like description of an exported model: the card's ``model_type``,
    ``model_params``, ``targets`` and ``config`` (its training config), plus the TorchScript
    bytes under :data:`TORCHSCRIPT_KEY`."""
    import torch

    extra = {CARD_NAME: ""}
    try:
        torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError and others
        raise CheckpointError(f"{shown} is not a loadable TorchScript model: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    try:
        card = json.loads(extra[CARD_NAME] or "null")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{shown}: its embedded model card is not JSON: {e}") from e
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise CheckpointError(f"{shown} is TorchScript without a catena-mito model card; export it with catena-mito export-model")
    if int(card.get("format_version", 0)) > CARD_VERSION:
        raise CheckpointError(f"{shown} has model card version {card.get('format_version')}; this catena-mito reads <= {CARD_VERSION}")
    return {
        "model_type": card["model_type"],
        "model_params": dict(card["model_params"]),
        "targets": list(card["targets"]),
        "config": dict(card.get("training_config") or {}),
        "catena_version": card.get("trained_with_catena_version"),
        "model_card": card,
        TORCHSCRIPT_KEY: data,
    }


def load_model_source(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``predict`` reads from ``model_path``: a checkpoint (as
    :func:`~catena_mito.checkpoint.load_checkpoint` returns it) or an exported TorchScript
    model (as :func:`read_exported` describes it); same keys either way."""
    from catena_mito.checkpoint import load_checkpoint

    shown = storage.redact_url(url)
    try:
        data = storage.read_bytes(url, storage_options)
    except storage.StorageError:
        data = b""  # let the checkpoint loader say what is wrong with the path
    if data and is_torchscript(data):
        return read_exported(data, shown)
    return load_checkpoint(url, storage_options, map_location="cpu")


def build_predict_model(source: Mapping[str, Any]) -> Any:
    """The model of :func:`load_model_source`'s result, ready for the runner (eval mode)."""
    if TORCHSCRIPT_KEY in source:
        import torch

        return torch.jit.load(io.BytesIO(source[TORCHSCRIPT_KEY]), map_location="cpu").eval()
    from catena_mito.checkpoint import build_model_from_checkpoint

    return build_model_from_checkpoint(source).eval()
