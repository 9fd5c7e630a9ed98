"""Model I/O that never runs uploaded code.

Formats:
- ``safetensors``: weights of ``net`` + the manifest JSON (embedded in the file's
  metadata under ``onp_manifest`` and/or given beside it). The header is parsed and
  checked by us first (length vs file size, dtypes, shapes vs byte ranges, overlaps),
  so a lying header gets a precise message instead of a library error;
- ``pt``: a state_dict loaded with ``torch.load(weights_only=True)`` + a manifest; a zip
  ``.pt`` is checked for compressed/oversized records first;
- ``pt2``: a ``torch.export`` program, for architectures the registry does not know;
  the input convention (float NCHW in [0, 1], normalisation inside) is the uploader's.
  ``torch.export.load`` is *not* safe on untrusted files; see :mod:`.exported` for what
  we found and how the archive is checked and rebuilt before torch reads it.

Every file is size-checked (``max_bytes``, default :data:`DEFAULT_MAX_MODEL_BYTES` or
``$ONP_MAX_MODEL_BYTES``) before it is parsed. Every failure is a :class:`ModelLoadError`
whose message a user can act on; weights must be finite and match the architecture.
"""
from __future__ import annotations

import json
import math
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from .manifest import ModelManifest
from .registry import ImageClassifier, UnknownArchitecture, build_model

MANIFEST_KEY = "onp_manifest"
FORMATS = ("safetensors", "pt", "pt2")
DEFAULT_MAX_MODEL_BYTES = int(os.environ.get("ONP_MAX_MODEL_BYTES", 1 << 30))
_MAX_HEADER = 100_000_000
_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


class ModelLoadError(ValueError):
    """The upload cannot be turned into a model; the message says why, for the user."""


@dataclass
class LoadedModel:
    model: ImageClassifier
    manifest: ModelManifest
    format: str


def detect_format(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return "pt"
    if suffix == ".pt2":
        return "pt2"
    raise ModelLoadError(f"unsupported model file extension {suffix!r}; use .safetensors, .pt or .pt2")


def _file_size(path: Path, max_bytes: int) -> int:
    try:
        if not path.is_file():
            raise ModelLoadError(f"{path.name}: no such model file")
        size = path.stat().st_size
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path.name}: {exc.strerror}") from None
    if size > max_bytes:
        raise ModelLoadError(f"the model file is {size} bytes, over the limit of {max_bytes} bytes")
    if size == 0:
        raise ModelLoadError("the model file is empty")
    return size


def read_bounded(path: Path, max_bytes: int) -> bytes:
    """The whole file, refused before reading if it is larger than ``max_bytes``."""
    _file_size(path, max_bytes)
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ModelLoadError(f"the model file is over the limit of {max_bytes} bytes")
    return data


def check_finite(state: dict[str, torch.Tensor]) -> None:
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelLoadError(f"tensor {key!r} contains NaN or Inf values")


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
    for key in expected:  # the architecture's order, so the first mismatch reported is stable
        tensor = state[key]
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelLoadError(f"tensor {key!r} has shape {tuple(tensor.shape)}, "
                                 f"architecture {model.manifest.arch!r} expects {tuple(expected[key].shape)}")
        if expected[key].is_floating_point() != tensor.is_floating_point():
            raise ModelLoadError(f"tensor {key!r} has dtype {tensor.dtype}, expected {expected[key].dtype}")
    check_finite(state)
    model.net.load_state_dict(state)


def _parse_manifest(text: str | bytes, where: str) -> ModelManifest:
    try:
        return ModelManifest.model_validate(json.loads(text))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"the manifest ({where}) is not valid JSON: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in exc.errors()[:5])
        raise ModelLoadError(f"the manifest ({where}) is invalid: {problems}") from None


def _manifest_from(path: Path, manifest: ModelManifest | None, embedded: str | None) -> ModelManifest:
    if manifest is not None:
        return manifest
    if embedded:
        return _parse_manifest(embedded, "embedded in the weights file")
    beside = path.with_name("manifest.json")
    if beside.is_file():
        if beside.stat().st_size > 1 << 20:
            raise ModelLoadError("manifest.json is larger than 1 MiB")
        return _parse_manifest(beside.read_bytes(), "manifest.json")
    raise ModelLoadError("a manifest (architecture, num_classes, input_shape) is required for this weights file")


def _build(man: ModelManifest) -> ImageClassifier:
    try:
        return build_model(man)
    except UnknownArchitecture as exc:
        raise ModelLoadError(str(exc)) from None


# --------------------------------------------------------------------------- safetensors


def _parse_safetensors_header(data: bytes) -> dict:
    """The header dict, after checking it against the file byte for byte."""
    if len(data) < 8:
        raise ModelLoadError(f"not a valid safetensors file: only {len(data)} bytes (truncated)")
    (n,) = struct.unpack("<Q", data[:8])
    if n < 2 or n > _MAX_HEADER:
        raise ModelLoadError(f"not a valid safetensors file: header length {n} is invalid")
    if 8 + n > len(data):
        raise ModelLoadError(f"not a valid safetensors file: the header claims {n} bytes but only "
                             f"{len(data) - 8} follow (truncated file or a lying header length)")
    try:
        header = json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelLoadError(f"not a valid safetensors file: the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ModelLoadError("not a valid safetensors file: the header is not a JSON object")
    body = len(data) - 8 - n
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise ModelLoadError("not a valid safetensors file: __metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ModelLoadError(f"not a valid safetensors file: entry {key!r} is malformed")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _ST_DTYPES:
            raise ModelLoadError(f"tensor {key!r} has unsupported dtype {dtype!r}")
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets)):
            raise ModelLoadError(f"tensor {key!r} has a malformed shape or data_offsets")
        begin, end = offsets
        nbytes = math.prod(shape) * _ST_DTYPES[dtype]
        if end < begin or end > body:
            raise ModelLoadError(f"tensor {key!r} claims bytes {begin}..{end} but the data section has only "
                                 f"{body} bytes (truncated file or lying header)")
        if end - begin != nbytes:
            raise ModelLoadError(f"tensor {key!r} of shape {tuple(shape)} and dtype {dtype} needs {nbytes} bytes "
                                 f"but its data_offsets span {end - begin}")
        spans.append((begin, end, key))
    spans.sort()
    pos = 0
    for begin, end, key in spans:
        if begin != pos:
            what = "overlaps another tensor" if begin < pos else "leaves a gap before it"
            raise ModelLoadError(f"not a valid safetensors file: tensor {key!r} {what}")
        pos = end
    if pos != body:
        raise ModelLoadError(f"not a valid safetensors file: {body - pos} trailing bytes after the last tensor")
    return header


def load_safetensors(path: Path, manifest: ModelManifest | None = None, max_bytes: int | None = None) -> LoadedModel:
    data = read_bounded(path, DEFAULT_MAX_MODEL_BYTES if max_bytes is None else max_bytes)
    header = _parse_safetensors_header(data)
    try:
        state = load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"not a valid safetensors file: {exc}") from None
    del data
    meta = header.get("__metadata__") or {}
    man = _manifest_from(path, manifest, meta.get(MANIFEST_KEY))
    model = _build(man)
    _load_state_into(model, state)
    return LoadedModel(model.eval(), man, "safetensors")


# --------------------------------------------------------------------------- torch.save state dicts


def _check_torch_zip(path: Path, size: int) -> None:
    """A zip-format ``.pt``: records must be stored (no decompression bombs) and fit in the file."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ModelLoadError(f"not a valid .pt file (broken zip container): {exc}") from None
    if len(infos) > 1_000_000:
        raise ModelLoadError("the .pt file has too many records")
    declared = 0
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise ModelLoadError(f"the .pt record {info.filename!r} is compressed or encrypted; "
                                 "torch.save writes records uncompressed")
        declared += info.file_size
    if declared > size:
        raise ModelLoadError("the .pt file's records declare more bytes than the file holds")


def load_state_dict_file(path: Path, manifest: ModelManifest | None = None,
                         max_bytes: int | None = None) -> LoadedModel:
    size = _file_size(path, DEFAULT_MAX_MODEL_BYTES if max_bytes is None else max_bytes)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":
        _check_torch_zip(path, size)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses any pickle global it does not allow
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"refused to load {path.name}: it is not a plain state_dict "
                             f"(only tensors may be stored; arbitrary pickles are never executed): {first}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise ModelLoadError("the .pt file must hold a state_dict: a mapping of names to tensors")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    man = _manifest_from(path, manifest, None)
    model = _build(man)
    _load_state_into(model, state)
    return LoadedModel(model.eval(), man, "pt")


def load_exported(path: Path, manifest: ModelManifest | None = None, max_bytes: int | None = None) -> LoadedModel:
    from .exported import load_exported_program

    return load_exported_program(path, manifest, max_bytes)


def load_model(path: str | Path, manifest: ModelManifest | None = None, *, max_bytes: int | None = None) -> LoadedModel:
    """Load any supported model file; a directory means ``manifest.json`` + one weights file.

    ``max_bytes`` caps the model file's size (checked before parsing).
    """
    path = Path(path)
    if path.is_dir():
        man = _manifest_from(path / "model", None, None) if (path / "manifest.json").is_file() else manifest
        for name in ("model.safetensors", "model.pt", "model.pt2"):
            if (path / name).exists():
                return load_model(path / name, man, max_bytes=max_bytes)
        raise ModelLoadError(f"no model.safetensors, model.pt or model.pt2 in {path.name}")
    fmt = detect_format(path)
    loader = {"safetensors": load_safetensors, "pt": load_state_dict_file, "pt2": load_exported}[fmt]
    try:
        return loader(path, manifest, max_bytes)
    except ModelLoadError:
        raise
    except MemoryError:
        raise ModelLoadError("the model needs more memory than is available") from None
    except RecursionError:
        raise ModelLoadError("the model file is malformed (nesting too deep)") from None


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
