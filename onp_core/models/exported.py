"""``torch.export`` programs (``.pt2``): models of architectures the registry does not know.

The program carries its own graph, so the engine can run and prune it without the
uploader's Python code. Normalisation is the program's business (done inside it).

Why ``torch.export.load`` is not called on an upload directly (torch 2.13)
--------------------------------------------------------------------------
Reading ``torch/export/__init__.py``, ``torch/export/pt2_archive/_package.py``,
``torch/_export/serde/serialize.py`` and ``torch/export/_unlift.py`` shows that a ``.pt2``
can run code while it is *loaded* or when the resulting module is *first called* — the
``torch.export.load`` docstring itself says "uses pickle under the hood … never load data from
an untrusted source". The paths we found (each one demonstrated by a hostile fixture in
``tests/test_model_io.py`` against plain ``torch.export.load``, and refused by this loader):

1. ``data/sample_inputs/<model>.pt`` (present in *every* archive) goes through
   ``deserialize_torch_artifact``: ``torch.load(weights_only=True)`` and, **if that fails, a
   fallback to ``torch.load(weights_only=False)``** — a ``__reduce__`` pickle runs at load.
2. Weights/constants whose payload config says ``"use_pickle": true`` are read with
   ``torch.load(weights_only=False)``.
3. Constants named ``opaque_obj_*`` are read with ``pickle.loads``; ``custom_obj_*`` with the
   TorchScript pickler.
4. Legacy layouts (``data/weights/<model>.pt``, ``data/constants/<model>.pt`` and the 2.7-era
   ``serialized_state_dict.pt``/``serialized_constants.pt`` archive, reached when the new
   reader raises) go through the same weights_only→unsafe fallback.
5. Symbolic shape expressions (``expr_str`` in ``models/<model>.json``, normally
   ``"Symbol('s77', positive=True, integer=True)"``) are parsed with ``sympy.sympify``, which
   ``eval``s the string: ``"__import__('os').system(...)"`` runs at load.
6. ``guards_code`` strings in the model JSON are pasted into Python source and ``exec``'d by
   ``ExportedProgram.module()``; the guard function runs on every forward call.
7. ``data/aotinductor/`` holds compiled shared libraries that ``load_pt2`` ``dlopen``s.
8. Node targets are resolved by ``getattr`` on ``torch``/``math``/``operator``; parameter
   names are pasted into generated FX code (``getattr(self, "<name>")``) without escaping.
9. ``aten::from_file`` reads an arbitrary file from disk when the graph runs.

What this loader does instead:

- refuses the file above a size limit before parsing; reads it into memory once (no
  time-of-check/time-of-use gap) and checks it with :mod:`zipfile`: one root folder, no
  traversal, no duplicates, every member stored uncompressed (so declared size == real
  size, no zip bombs), and **only** the members a plain ``torch.export.save`` writes —
  no ``aotinductor``/``executorch``/``mtia``/``extra`` folders, no legacy pickles, no custom
  or opaque objects;
- checks the JSON: payload configs have ``use_pickle: false``, tensor sizes fit their records;
  names are plain dotted identifiers; ``expr_str`` only uses SymPy constructors on an allow-list
  (no attribute access, no dunders, no subscripts); ``guards_code`` is empty; node targets
  are ``aten``/``prims`` operators or plain arithmetic from ``operator``/``math``;
- loads ``sample_inputs`` itself with ``torch.load(weights_only=True)`` and replaces it with
  a re-serialisation of the checked result;
- rebuilds a fresh archive from the checked members with torch's own writer (so torch reads
  exactly what was checked — no parser differentials between :mod:`zipfile` and miniz);
- calls ``torch.export.load`` with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` set, so even a missed
  fallback could not unpickle arbitrary objects;
- verifies the deserialised graph again (targets are allowed ``OpOverload``\\ s, no file-reading
  operators), builds the module with ``check_guards=False`` (no ``exec`` of guard code), checks
  weights are finite and runs a batch of 1 and of 2 zeros through it.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import operator
import os
import re
import threading
import zipfile
from pathlib import Path
from typing import Any

import torch

from .manifest import ModelManifest
from .registry import ImageClassifier

_ROOT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_MEMBER_PATTERNS = [re.compile(p) for p in (
    r"archive_format", r"archive_version", r"byteorder", r"\.data/version", r"\.data/serialization_id",
    r"models/model\.json", r"data/weights/model_weights_config\.json", r"data/weights/weight_\d{1,7}",
    r"data/constants/model_constants_config\.json", r"data/constants/tensor_\d{1,7}",
    r"data/sample_inputs/model\.pt",
)]
_AUTO_RECORDS = {".data/version", ".data/serialization_id", "byteorder"}  # torch's writer adds these itself
_FQN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_MODULE_FQN = re.compile(r"^$|^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*(@\d+)?$")
_OP_TARGET = re.compile(r"^torch\.ops\.(aten|prims)\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+$")
_PY_TARGETS = {f"_operator.{n}" for n in (
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
    "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_")} | {
    "torch.sym_int", "torch.sym_float", "torch.sym_max", "torch.sym_min", "torch.sym_not", "torch.sym_sqrt",
    "torch.sym_ite", "math.ceil", "math.floor", "math.trunc", "math.sqrt"}
_PY_CALLABLES = {getattr(operator, t.split(".")[1]) for t in _PY_TARGETS if t.startswith("_operator.")} | {
    torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_sqrt, torch.sym_ite,
    math.ceil, math.floor, math.trunc, math.sqrt}
_DENIED_OPS = {"from_file", "_load_jit_decomp", "_nested_from_file"}
_SYMPY_NAMES = {
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Mod", "floor", "ceiling",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan",
    "Equality", "Unequality", "And", "Or", "Not", "true", "false", "True", "False", "oo", "zoo", "nan", "Piecewise",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "OpaqueUnaryFn_sqrt",
    "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "BitwiseFn_bitwise_xor",
    # keyword arguments of Symbol(...)
    "positive", "integer", "nonnegative", "negative", "real", "finite", "even", "odd", "nonzero", "zero", "evaluate",
}
_SYMPY_TOKEN = re.compile(r"\s+|'[a-z]{1,3}\d{1,9}'|\d+(?:\.\d+)?(?:e[+-]?\d+)?|[A-Za-z_][A-Za-z0-9_]*"
                          r"|\*\*|[(),=+\-*/<>!%]")
_MAX_JSON = 64 << 20
_ENV_LOCK = threading.Lock()


def _err(msg: str) -> Exception:
    from .io import ModelLoadError

    return ModelLoadError(msg)


# --------------------------------------------------------------------------- archive checks


def _check_sympy_expr(expr: str) -> None:
    if len(expr) > 4096:
        raise _err("a symbolic shape expression in the program is too long")
    pos = 0
    while pos < len(expr):
        m = _SYMPY_TOKEN.match(expr, pos)
        if not m:
            raise _err(f"refused a symbolic shape expression that is not plain arithmetic: {expr[:80]!r}")
        tok = m.group(0)
        if tok[0].isalpha() or tok[0] == "_":
            if tok not in _SYMPY_NAMES and not re.fullmatch(r"[a-z]{1,3}\d{1,9}", tok):
                raise _err(f"refused a symbolic shape expression using {tok!r}: {expr[:80]!r}")
        pos = m.end()


def _walk_json(obj: Any, key: str | None = None, depth: int = 0) -> None:
    """Check every string of the model JSON that torch would resolve, parse or paste into code."""
    if depth > 200:
        raise _err("the program's graph JSON is nested too deeply")
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("as_graph", "as_custom_obj"):
                raise _err(f"the program uses {k[3:].replace('_', ' ')} arguments (higher-order or TorchScript "
                           "objects), which are not supported")
            if k == "guards_code":
                if v:
                    raise _err("the program carries guards_code (Python source torch would exec); re-export it "
                               "with a plain torch.export.export")
                continue
            if k == "custom_obj_values" and v:
                raise _err("the program holds custom TorchScript objects, which are not supported")
            if k == "metadata" and isinstance(v, dict):
                continue  # free text (stack traces); torch only getattr()s on torch.* for source_fn names
            _walk_json(v, k, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _walk_json(v, key, depth + 1)
    elif isinstance(obj, str):
        if key == "expr_str":
            _check_sympy_expr(obj)
        elif key in ("parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name", "name"):
            if not _FQN.fullmatch(obj):
                raise _err(f"refused the program: name {obj[:80]!r} is not a plain dotted identifier")
        elif key == "fqn":
            if not _MODULE_FQN.fullmatch(obj):
                raise _err(f"refused the program: module path {obj[:80]!r} is not a plain dotted identifier")
        elif key in ("target", "as_operator"):
            if not (_OP_TARGET.fullmatch(obj) or obj in _PY_TARGETS):
                raise _err(f"refused the program: it calls {obj[:80]!r}; only aten/prims operators and plain "
                           "arithmetic are allowed")
            if _OP_TARGET.fullmatch(obj) and obj.split(".")[3] in _DENIED_OPS:
                raise _err(f"refused the program: operator {obj!r} reads files")


def _check_payload_config(raw: bytes, what: str, records: dict[str, bytes], directory: str, prefix: str) -> None:
    try:
        config = json.loads(raw)["config"]
        assert isinstance(config, dict)
    except Exception:
        raise _err(f"the {what} config of the program is not valid JSON") from None
    from torch._export.serde.serialize import deserialize_scalar_type

    for fqn, meta in config.items():
        if not isinstance(fqn, str) or not _FQN.fullmatch(fqn):
            raise _err(f"refused the program: {what} name {str(fqn)[:80]!r} is not a plain dotted identifier")
        if not isinstance(meta, dict):
            raise _err(f"{what} {fqn!r}: malformed config entry")
        if meta.get("use_pickle") is not False:
            raise _err(f"refused the program: {what} {fqn!r} is stored as a pickle (use_pickle), and unpickling "
                       "an upload can run arbitrary code; only plain tensors are accepted")
        path_name = meta.get("path_name")
        if not isinstance(path_name, str) or not re.fullmatch(prefix + r"\d{1,7}", path_name):
            raise _err(f"refused the program: {what} {fqn!r} points at {str(path_name)[:80]!r}, not a plain "
                       "tensor record")
        record = directory + path_name
        if record not in records:
            raise _err(f"the program's {what} {fqn!r} record {record} is missing")
        tm = meta.get("tensor_meta")
        try:
            dtype = deserialize_scalar_type(tm["dtype"])
            sizes = [int(s["as_int"]) for s in tm["sizes"]]
            strides = [int(s["as_int"]) for s in tm["strides"]]
            offset = int(tm["storage_offset"]["as_int"])
            device = tm["device"]["type"]
        except Exception:
            raise _err(f"the program's {what} {fqn!r} has malformed or symbolic tensor metadata") from None
        if device not in ("cpu", "cuda"):
            raise _err(f"the program's {what} {fqn!r} lives on device {device!r}; export on CPU")
        if len(sizes) != len(strides) or any(s < 0 for s in sizes + strides) or offset < 0 or len(sizes) > 8:
            raise _err(f"the program's {what} {fqn!r} has invalid sizes/strides")
        numel = math.prod(sizes)
        if not records[record] and numel:
            raise _err(f"the program's {what} {fqn!r} declares {numel} elements but its record is empty "
                       "(torch would allocate it from the metadata alone)")
        need = 0 if numel == 0 else (offset + sum((s - 1) * st for s, st in zip(sizes, strides)) + 1)
        have = len(records[record]) // torch.empty((), dtype=dtype).element_size()
        if len(records[record]) and need > have:
            raise _err(f"the program's {what} {fqn!r} needs {need} elements but its record holds {have} "
                       "(truncated or lying metadata)")


def _safe_sample_inputs(raw: bytes) -> bytes:
    try:
        with _forced_weights_only():
            obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _err("refused the program: its sample inputs are not plain tensors (loading them would need "
                   f"the unsafe pickle fallback torch.export.load uses): {str(exc).splitlines()[0][:200]}") from None
    ok = (isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], tuple) and isinstance(obj[1], dict)
          and all(isinstance(t, torch.Tensor) for t in obj[0]))
    if not ok:
        raise _err("refused the program: its sample inputs must be one tuple of image tensors")
    if any(t.numel() > 64 * 1024 * 1024 for t in obj[0]):
        raise _err("refused the program: its sample inputs are too large")
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@contextlib.contextmanager
def _forced_weights_only():
    """Make every ``torch.load`` in this block weights-only, even one that asks for ``weights_only=False``."""
    with _ENV_LOCK:
        old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def sanitize_pt2(data: bytes) -> bytes:
    """Check a ``.pt2`` archive (see the module docstring) and return a rebuilt, checked copy."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError) as exc:
        raise _err(f"not a torch.export .pt2 archive (not a valid zip): {exc}") from None
    if len(infos) > 100_000:
        raise _err(f"the .pt2 archive has {len(infos)} entries; refused")
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise _err("the .pt2 archive has duplicate entries; refused")
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or not all("/" in n for n in names):
        if any(n.split("/")[-1] in ("serialized_state_dict.pt", "serialized_exported_program.json") for n in names):
            raise _err("refused the .pt2: it uses the legacy (torch <= 2.7) layout, which unpickles weights; "
                       "re-save it with torch.export.save from torch >= 2.8")
        raise _err("the .pt2 archive must hold exactly one root folder (as torch.export.save writes)")
    root = next(iter(roots))
    if not _ROOT.fullmatch(root):
        raise _err(f"the .pt2 archive's root folder {root[:80]!r} is not a plain name")
    records: dict[str, bytes] = {}
    total = 0
    for info in infos:
        rel = info.filename[len(root) + 1:]
        if info.is_dir() or not rel:
            continue
        if not any(p.fullmatch(rel) for p in _MEMBER_PATTERNS):
            hint = ""
            if rel.startswith("data/aotinductor/"):
                hint = " (AOTInductor packages contain native code that would be loaded)"
            elif rel.startswith(("data/weights/", "data/constants/")) and rel.endswith(".pt"):
                hint = " (legacy pickled weights)"
            elif "custom_obj_" in rel or "opaque_obj_" in rel:
                hint = " (pickled objects)"
            raise _err(f"refused the .pt2: unexpected member {rel[:120]!r}{hint}; only what a plain "
                       "torch.export.save writes is accepted")
        if info.flag_bits & 0x1 or info.compress_type != zipfile.ZIP_STORED:
            raise _err(f"refused the .pt2: member {rel!r} is compressed or encrypted (torch.export.save stores "
                       "members uncompressed)")
        total += info.file_size
        if total > len(data):
            raise _err("refused the .pt2: its members declare more bytes than the file holds")
        try:
            records[rel] = zf.read(info)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise _err(f"the .pt2 archive is corrupt at {rel!r}: {exc}") from None
    for required in ("archive_format", "archive_version", "models/model.json",
                     "data/weights/model_weights_config.json", "data/constants/model_constants_config.json",
                     "data/sample_inputs/model.pt"):
        if required not in records:
            raise _err(f"the .pt2 archive lacks {required!r}; save it with torch.export.save")
    from torch.export.pt2_archive.constants import ARCHIVE_FORMAT_VALUE, ARCHIVE_VERSION_VALUE

    if records["archive_format"] != ARCHIVE_FORMAT_VALUE.encode():
        raise _err("the archive is not a pt2 archive (archive_format)")
    if records["archive_version"] != ARCHIVE_VERSION_VALUE.encode():
        raise _err(f"unsupported pt2 archive version {records['archive_version'][:20]!r}")
    if records.get("byteorder", b"little") != b"little":
        raise _err("big-endian .pt2 archives are not supported")
    if len(records["models/model.json"]) > _MAX_JSON:
        raise _err("the program's graph JSON is too large")
    try:
        model_json = json.loads(records["models/model.json"])
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise _err(f"the program's graph JSON is invalid: {exc}") from None
    if not isinstance(model_json, dict) or "graph_module" not in model_json:
        raise _err("the program's graph JSON is not a serialized ExportedProgram")
    try:
        _walk_json(model_json)
    except RecursionError:
        raise _err("the program's graph JSON is nested too deeply") from None
    _check_payload_config(records["data/weights/model_weights_config.json"], "weight", records,
                          "data/weights/", "weight_")
    _check_payload_config(records["data/constants/model_constants_config.json"], "constant", records,
                          "data/constants/", "tensor_")
    records["data/sample_inputs/model.pt"] = _safe_sample_inputs(records["data/sample_inputs/model.pt"])

    from torch.export.pt2_archive._package import PT2ArchiveWriter

    out = io.BytesIO()
    with PT2ArchiveWriter(out) as writer:
        for rel, payload in records.items():
            if rel not in _AUTO_RECORDS:
                writer.write_bytes(rel, payload)
    return out.getvalue()


# --------------------------------------------------------------------------- load / save


def _check_graph(program: torch.export.ExportedProgram) -> None:
    for node in program.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op != "call_function":
            raise _err(f"refused the program: node {node.name!r} is a {node.op}; only operator calls are allowed")
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            if t.namespace not in ("aten", "prims") or t._schema.name.split("::")[-1] in _DENIED_OPS:
                raise _err(f"refused the program: it calls operator {t}")
            if any(a.name in ("filename", "path", "file") for a in t._schema.arguments):
                raise _err(f"refused the program: operator {t} takes a file name")
        elif t not in _PY_CALLABLES:
            raise _err(f"refused the program: it calls {t!r}; only aten/prims operators are allowed")


def load_exported_program(path: Path, manifest: ModelManifest | None = None,
                          max_bytes: int | None = None) -> "LoadedModel":  # noqa: F821
    from .io import DEFAULT_MAX_MODEL_BYTES, LoadedModel, ModelLoadError, check_finite, read_bounded

    data = read_bounded(path, DEFAULT_MAX_MODEL_BYTES if max_bytes is None else max_bytes)
    clean = sanitize_pt2(data)
    try:
        with _forced_weights_only():
            program = torch.export.load(io.BytesIO(clean))
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"not a loadable torch.export program: {str(exc).splitlines()[0][:300]}") from None
    _check_graph(program)
    try:
        net = program.module(check_guards=False)
    except Exception as exc:
        raise ModelLoadError(f"the program cannot be turned into a module: {str(exc)[:300]}") from None
    check_finite({**dict(net.named_parameters()), **dict(net.named_buffers())})
    inferred = _infer_manifest(program)
    if manifest is None:
        manifest = inferred
    elif (tuple(manifest.input_shape) != tuple(inferred.input_shape)
          or manifest.num_classes != inferred.num_classes):
        raise ModelLoadError(f"the manifest says input {tuple(manifest.input_shape)} and {manifest.num_classes} "
                             f"classes, but the program takes {tuple(inferred.input_shape)} and outputs "
                             f"{inferred.num_classes} classes")
    model = ImageClassifier(net, manifest.model_copy(update={"arch": "exported", "mean": None, "std": None}))
    _smoke_test(model)
    return LoadedModel(model.eval(), model.manifest, "pt2")


def _smoke_test(model: ImageClassifier) -> None:
    c, h, w = model.manifest.input_shape
    for n in (1, 2):
        try:
            with torch.no_grad():
                out = model(torch.zeros(n, c, h, w))
        except Exception as exc:
            raise _err(f"the program does not run on a batch of {n} {c}×{h}×{w} images "
                       f"(export it with a dynamic batch dimension): {str(exc).splitlines()[0][:200]}") from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n, model.manifest.num_classes):
            raise _err(f"the program must return one N×{model.manifest.num_classes} logits tensor")


def _infer_manifest(program: torch.export.ExportedProgram) -> ModelManifest:
    from pydantic import ValidationError

    user_input = torch.export.graph_signature.InputKind.USER_INPUT
    inputs = [s for s in program.graph_signature.input_specs if s.kind == user_input]
    if len(inputs) != 1:
        raise _err(f"the program must take exactly one image tensor, it takes {len(inputs)} inputs")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == inputs[0].arg.name)
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise _err("the program's input is not a tensor")
    shape = tuple(int(s) if isinstance(s, int) else -1 for s in val.shape)
    if len(shape) != 4 or min(shape[1:]) < 1:
        raise _err(f"the program's input must be N x C x H x W with static C, H, W; got {shape}")
    outs = [s for s in program.graph_signature.output_specs
            if s.kind == torch.export.graph_signature.OutputKind.USER_OUTPUT]
    if len(outs) != 1:
        raise _err(f"the program must return exactly one logits tensor, it returns {len(outs)} outputs")
    out_node = next(n for n in program.graph.nodes if n.op == "output").args[0]
    out_node = out_node[0] if isinstance(out_node, (tuple, list)) else out_node
    out_val = out_node.meta.get("val") if hasattr(out_node, "meta") else None
    if not isinstance(out_val, torch.Tensor) or out_val.ndim != 2 or not isinstance(out_val.shape[-1], int):
        raise _err("the program must return an N x num_classes logits tensor")
    try:
        return ModelManifest(arch="exported", num_classes=int(out_val.shape[-1]),
                             input_shape=shape[1:])  # type: ignore[arg-type]
    except ValidationError as exc:
        raise _err(f"the program's shapes are not supported: {exc.errors()[0]['msg']}") from None


def save_exported_program(model: ImageClassifier, path: Path) -> None:
    c, h, w = model.manifest.input_shape
    example = (torch.rand(2, c, h, w),)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(model.eval(), example, dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
