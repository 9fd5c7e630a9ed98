"""Everything checked before a job is queued: a job that is accepted must be runnable.

The model is actually loaded on the CPU (the same loader the worker uses, never
unpickling), the clean data actually read, and the two checked against each other,
so a mismatch is a precise 422 now rather than a failed job minutes later.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from pydantic import ValidationError

from store.artifacts import data_suffix

from .schemas import RepairOptions
from .uploads import Form, Part


@dataclass
class ValidRepair:
    options: RepairOptions
    manifest: dict[str, Any]
    model_format: str
    model: Part
    data: Part
    triggered: Part | None


def _fail(msg: str, status: int = 422) -> HTTPException:
    return HTTPException(status, msg)


def _pydantic_reason(exc: ValidationError, where: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{where}{'.' + loc if loc else ''}: {err.get('msg')}")
    return "; ".join(parts)


def parse_options(form: Form) -> RepairOptions:
    part = form.get("options")
    raw = part.text() if part else "{}"
    try:
        payload = json.loads(raw or "{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(f"options is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise _fail("options must be a JSON object")
    target_part = form.get("target")
    if target_part is not None:
        text = target_part.text().strip()
        if not text.lstrip("-").isdigit():
            raise _fail(f"target must be an integer class index, got {text[:20]!r}")
        payload.setdefault("target", int(text))
    try:
        opts = RepairOptions.model_validate(payload)
    except ValidationError as exc:
        raise _fail(_pydantic_reason(exc, "options")) from None
    check_method_options(opts)
    return opts


def check_method_options(opts: RepairOptions) -> None:
    """``make_config`` validates method options exactly as the worker will use them."""
    from onp_core.defenses import make_config

    try:
        device = "cuda" if opts.device == "gpu" else "cpu"
        make_config(opts.method, {**opts.options, "seed": opts.seed, "device": device})
    except ValidationError as exc:
        raise _fail(_pydantic_reason(exc, "options.options")) from None
    except ModuleNotFoundError:
        raise _fail(f"method {opts.method!r} is not available on this server") from None
    except ValueError as exc:  # unknown method name
        raise _fail(f"options.method: {exc}") from None


def _manifest(form: Form) -> Any:
    from onp_core.models import ModelManifest

    part = form.get("manifest")
    if part is None:
        return None
    try:
        return ModelManifest.model_validate(json.loads(part.text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(f"manifest is not valid JSON: {exc}") from None
    except ValidationError as exc:
        raise _fail(_pydantic_reason(exc, "manifest")) from None


def _named(part: Part, suffix: str) -> Path:
    """Loaders pick the format by extension: give the temp file the upload's suffix."""
    target = part.path.with_name(f"{part.name}-upload{suffix}")
    if part.path != target:
        part.path.rename(target)
        part.path = target
    return target


def _read_images(part: Part, what: str, manifest: Any) -> Any:
    from onp_core.data.uploads import DataFormatError, read_clean_data

    suffix = data_suffix(part.filename)
    try:
        data = read_clean_data(_named(part, suffix), num_classes=manifest.num_classes)
    except DataFormatError as exc:
        raise _fail(f"{what}: {exc}") from None
    except (KeyError, ValueError, OSError, EOFError) as exc:  # numpy/zip errors from a damaged file
        raise _fail(f"{what}: could not be read as {suffix} ({type(exc).__name__}: {exc})") from None
    if len(data) == 0:
        raise _fail(f"{what}: holds no images")
    if tuple(data.shape) != tuple(manifest.input_shape):
        raise _fail(f"{what}: images have shape (C,H,W)={tuple(data.shape)} but the model expects "
                    f"{tuple(manifest.input_shape)}")
    lo, hi = int(data.labels.min()), int(data.labels.max())
    if lo < 0 or hi >= manifest.num_classes:
        raise _fail(f"{what}: labels must be within 0..{manifest.num_classes - 1}, found {lo}..{hi}")
    return data


def _require_prunable(loaded: Any) -> None:
    """Refuse a model with no conv/BN channel (e.g. an MLP) now, not as a failed job later.

    Tracing also catches programs ``torch.export`` cannot re-trace with a free batch size,
    which every defense needs.
    """
    from onp_core.neurons import NoPrunableNeurons, discover_neurons

    try:
        discover_neurons(loaded.model, loaded.manifest.input_shape)
    except NoPrunableNeurons as exc:
        raise _fail(f"model: {exc}") from None
    except Exception as exc:
        raise _fail(f"model: its graph could not be traced for pruning ({type(exc).__name__}: {exc})") from None


def validate_repair(form: Form) -> ValidRepair:
    """Raise a 4xx HTTPException with a precise reason, or return what the job needs."""
    from onp_core.models import ModelLoadError, load_model
    from onp_core.models.io import detect_format

    options = parse_options(form)
    model_part, data_part, trig_part = form.get("model"), form.get("data"), form.get("triggered")
    if model_part is None or model_part.size == 0:
        raise _fail("a non-empty 'model' file is required (.safetensors, .pt or .pt2)")
    if data_part is None or data_part.size == 0:
        raise _fail("a non-empty 'data' file of clean images is required")
    manifest = _manifest(form)
    suffix = Path(model_part.filename or "").suffix.lower()
    try:
        fmt = detect_format(Path(f"model{suffix}"))
        loaded = load_model(_named(model_part, suffix), manifest)
    except ModelLoadError as exc:
        raise _fail(f"model: {exc}") from None
    except Exception as exc:  # any other loader failure is still the upload's fault
        raise _fail(f"model: could not be loaded ({type(exc).__name__}: {exc})") from None
    man = loaded.manifest
    _require_prunable(loaded)
    _read_images(data_part, "data", man)
    if trig_part is not None:
        if options.target is None:
            raise _fail("a triggered set needs 'target' (the backdoor target class) to report ASR")
        _read_images(trig_part, "triggered", man)
    if options.target is not None and options.target >= man.num_classes:
        raise _fail(f"target {options.target} is out of range for {man.num_classes} classes")
    return ValidRepair(options, json.loads(man.model_dump_json()), fmt, model_part, data_part, trig_part)
