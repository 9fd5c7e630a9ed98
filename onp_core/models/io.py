"""Model I/O that never runs uploaded code.

Formats:
- ``safetensors``: weights of ``net`` + the manifest JSON (embedded in the file's
  metadata under ``onp_manifest`` and/or given beside it);
- ``pt``: a state_dict loaded with ``torch.load(weights_only=True)`` + a manifest;
- ``pt2``: a ``torch.export`` program, for architectures the registry does not know;
  the input convention (float NCHW in [0, 1], normalisation inside) is the uploader's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .manifest import ModelManifest
from .registry import ImageClassifier, build_model

MANIFEST_KEY = "onp_manifest"
FORMATS = ("safetensors", "pt", "pt2")


class ModelLoadError(ValueError):
    """The upload cannot be turned into a model; the message says why, for the user."""


@dataclass
class LoadedModel:
    model: ImageClassifier
    manifest: ModelManifest
    format: str


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return "pt"
    if suffix == ".pt2":
        return "pt2"
    raise ModelLoadError(f"unsupported model file extension {suffix!r}; use .safetensors, .pt or .pt2")


def _load_state_into(model: ImageClassifier, state: dict[str, torch.Tensor]) -> None:
    expected = model.net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(
            f"weights do not match architecture {model.manifest.arch!r}: "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelLoadError(f"tensor {key!r} has shape {tuple(tensor.shape)}, "
                                 f"architecture expects {tuple(expected[key].shape)}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelLoadError(f"tensor {key!r} contains NaN or Inf values")
    model.net.load_state_dict(state)


def _manifest_from(path: Path, manifest: ModelManifest | None, embedded: str | None) -> ModelManifest:
    if manifest is not None:
        return manifest
    if embedded:
        return ModelManifest.model_validate(json.loads(embedded))
    beside = path.with_name("manifest.json")
    if beside.exists():
        return ModelManifest.load(beside)
    raise ModelLoadError("a manifest (architecture, num_classes, input_shape) is required for this weights file")


def load_safetensors(path: Path, manifest: ModelManifest | None = None) -> LoadedModel:
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len <= 0 or header_len > 100_000_000:
                raise ModelLoadError("safetensors header length is invalid")
            header = json.loads(f.read(header_len))
        state = load_file(path)
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ModelLoadError(f"not a valid safetensors file: {exc}") from None
    meta = header.get("__metadata__") or {}
    man = _manifest_from(path, manifest, meta.get(MANIFEST_KEY))
    model = build_model(man)
    _load_state_into(model, state)
    return LoadedModel(model.eval(), man, "safetensors")


def load_state_dict_file(path: Path, manifest: ModelManifest | None = None) -> LoadedModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses any pickle global it does not allow
        raise ModelLoadError(f"refused to load {path.name}: it is not a plain state_dict "
                             f"(only tensors may be stored; arbitrary pickles are never executed): {exc}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError("the .pt file must hold a state_dict: a mapping of names to tensors")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    man = _manifest_from(path, manifest, None)
    model = build_model(man)
    _load_state_into(model, state)
    return LoadedModel(model.eval(), man, "pt")


def load_exported(path: Path, manifest: ModelManifest | None = None) -> LoadedModel:
    from .exported import load_exported_program

    return load_exported_program(path, manifest)


def load_model(path: str | Path, manifest: ModelManifest | None = None) -> LoadedModel:
    """Load any supported model file; a directory means ``manifest.json`` + one weights file."""
    path = Path(path)
    if path.is_dir():
        man = ModelManifest.load(path / "manifest.json") if (path / "manifest.json").exists() else manifest
        for name in ("model.safetensors", "model.pt", "model.pt2"):
            if (path / name).exists():
                return load_model(path / name, man)
        raise ModelLoadError(f"no model.safetensors, model.pt or model.pt2 in {path}")
    fmt = detect_format(path)
    loader = {"safetensors": load_safetensors, "pt": load_state_dict_file, "pt2": load_exported}[fmt]
    return loader(path, manifest)


def save_model(model: ImageClassifier, path: str | Path, fmt: str = "safetensors") -> Path:
    """Write ``model`` in ``fmt``; safetensors embeds the manifest and also writes it beside."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = model.manifest
    if fmt == "safetensors":
        state = {k: v.detach().contiguous().cpu() for k, v in model.net.state_dict().items()}
        save_file(state, str(path), metadata={MANIFEST_KEY: manifest.model_dump_json()})
        manifest.save(path.with_name("manifest.json"))
    elif fmt == "pt":
        torch.save({k: v.detach().cpu() for k, v in model.net.state_dict().items()}, path)
        manifest.save(path.with_name("manifest.json"))
    elif fmt == "pt2":
        from .exported import save_exported_program

        save_exported_program(model, path)
    else:
        raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")
    return path
