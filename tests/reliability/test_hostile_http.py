"""Hostile uploads over HTTP, each with the real file: 4xx with a precise reason, in bounded time and
memory, and nothing stored or queued. Code-executing pickles (``.pt``) and ``.pt2`` archives must never
run: each creates a marker file when unpickled/evaluated, and the marker must never appear.

The engine-level tests (tests/test_model_io.py, tests/test_data_readers.py) prove the readers; these prove
the same files are refused through the real API (streaming parser, validation, error mapping).
"""
from __future__ import annotations

import io
import json
import struct
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from onp_service_fixtures import job_count
from relutil import peak_rss_bytes, reset_peak_rss, rss_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared hostile-file builders
from hostile import pt2 as hostile_pt2  # noqa: E402
from hostile.archives import (encode, png_with_declared_size, special_tarinfo, write_tar, write_zip,  # noqa: E402
                              zip_symlink, zip_with_encrypted_flag)
from hostile.pickles import evil_pickle, evil_torch_save, fresh_marker  # noqa: E402

MAX_SECONDS = 30.0  # per hostile request, including validation
MAX_EXTRA_RSS = 256 << 20  # peak memory growth of the API process per hostile request
PNG8 = encode(np.zeros((3, 8, 8), np.uint8))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, inputs) -> dict[str, Any]:
    from onp_core.models import ModelManifest, build_model, save_model

    root = tmp_path_factory.mktemp("hostile")
    markers = root / "markers"
    markers.mkdir()
    f: dict[str, Any] = {"markers": markers}
    # ---- models
    f["evil_torch_save.pt"] = root / "evil1.pt"
    f["evil_torch_save.pt"].write_bytes(evil_torch_save(markers / "PWNED_pt_zip"))
    f["evil_raw_pickle.pt"] = root / "evil2.pt"
    f["evil_raw_pickle.pt"].write_bytes(evil_pickle(markers / "PWNED_pt_raw"))
    torch.manual_seed(0)
    model = build_model(ModelManifest(arch="small_cnn", num_classes=10, input_shape=(3, 32, 32)))
    good_pt2 = save_model(model, root / "good" / "model.pt2", "pt2")
    for variant in hostile_pt2.VARIANTS:
        f[f"pt2:{variant}"] = hostile_pt2.make_variant(good_pt2, root / f"{variant}.pt2", variant,
                                                       markers / f"PWNED_pt2_{variant}")
    f["pt2:legacy_layout"] = hostile_pt2.legacy_archive(root / "legacy.pt2", markers / "PWNED_pt2_legacy")
    data = inputs.model.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    f["st:truncated"] = _write(root / "trunc.safetensors", data[: len(data) - 1000])
    f["st:header_len_lies"] = _write(root / "hlen.safetensors", struct.pack("<Q", 10**12) + data[8:])
    f["st:header_cut"] = _write(root / "hcut.safetensors", data[: 8 + n // 2])
    bad = json.loads(json.dumps(header))
    bad["classifier.weight"]["shape"] = [s * 2 for s in bad["classifier.weight"]["shape"]]
    raw = json.dumps(bad).encode()
    f["st:shape_vs_offsets"] = _write(root / "shape.safetensors", struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    for value, name in ((float("nan"), "nan"), (float("inf"), "inf")):
        poisoned = build_model(ModelManifest(arch="small_cnn", num_classes=10, input_shape=(3, 32, 32)))
        with torch.no_grad():
            poisoned.net.classifier.weight[0, 0] = value
        f[f"st:{name}"] = save_model(poisoned, root / name / "model.safetensors")
    f["manifest_5_classes"] = json.dumps({**inputs.manifest, "num_classes": 5})
    # ---- data
    f["zip_bomb"] = write_zip(root / "bomb.zip", {"0/a.bmp": b"\0" * (16 << 20)})  # 16 MiB → 16 KiB
    f["zip_bomb_big"] = write_zip(root / "bomb2.zip", {"0/a.bmp": b"\0" * (256 << 20)})  # 256 MiB → 255 KiB
    bomb = io.BytesIO()
    np.savez_compressed(bomb, x=np.zeros((2000, 3, 32, 32), np.uint8), y=np.zeros(2000, np.int64))
    f["npz_bomb"] = _write(root / "bomb.npz", bomb.getvalue())
    f["tar_bomb"] = write_tar(root / "bomb.tar.gz", {"0/a.png": PNG8, "0/b.bmp": b"\0" * (48 << 20)})
    f["zip_traversal"] = write_zip(root / "trav.zip", {"0/ok.png": PNG8, "../../evil.png": PNG8})
    f["tar_traversal"] = write_tar(root / "trav.tar", {"0/ok.png": PNG8, "0/../../evil.png": PNG8}, "w")
    f["tar_absolute"] = write_tar(root / "abs.tar", {"0/ok.png": PNG8, "/etc/evil.png": PNG8}, "w")
    f["zip_symlink"] = zip_symlink(root / "link.zip", "0/x.png", "/etc/passwd")
    f["tar_symlink"] = write_tar(root / "link.tar.gz", {"0/ok.png": PNG8},
                                 extra=[special_tarinfo("0/l.png", tarfile.SYMTYPE, "/etc/passwd")])
    f["tar_hardlink"] = write_tar(root / "hard.tar.gz", {"0/ok.png": PNG8},
                                  extra=[special_tarinfo("0/h.png", tarfile.LNKTYPE, "/etc/shadow")])
    f["zip_encrypted"] = zip_with_encrypted_flag(root / "enc.zip", "0/x.png", PNG8)
    f["huge_dims"] = write_zip(root / "huge.zip", {"0/a.png": png_with_declared_size(5000, 4000)})
    f["pixel_bomb"] = write_zip(root / "pbomb.zip", {"0/a.png": png_with_declared_size(100_000, 100_000)})
    f["many_tiny"] = write_zip(root / "many.zip", {f"{i % 10}/{i}.png": PNG8 for i in range(20_000)},
                               zipfile.ZIP_STORED)
    return f


def _write(path: Path, blob: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return path


def _post(alice: httpx.Client, model: Path, data: Path, manifest: str | None = None) -> tuple[httpx.Response, float,
                                                                                            int]:
    files: dict[str, Any] = {"model": (model.name, model.read_bytes()), "data": (data.name, data.read_bytes()),
                             "options": (None, json.dumps({"method": "clp"}))}
    if manifest is not None:
        files["manifest"] = (None, manifest)
    tracked = reset_peak_rss()
    base = rss_bytes()
    t0 = time.monotonic()
    r = alice.post("/v1/repairs", files=files)
    elapsed = time.monotonic() - t0
    extra = peak_rss_bytes() - base if tracked else 0
    return r, elapsed, extra


MODEL_CASES = {
    # name: (file key, needs manifest, reason fragment)
    "pickle executing code in a torch.save .pt": ("evil_torch_save.pt", True, "never executed"),
    "raw pickle executing code as .pt": ("evil_raw_pickle.pt", True, "never executed"),
    **{f".pt2 {v}": (f"pt2:{v}", False, "model:") for v in hostile_pt2.VARIANTS},
    ".pt2 legacy layout with pickles": ("pt2:legacy_layout", False, "legacy"),
    "truncated safetensors": ("st:truncated", False, "data section has only"),
    "safetensors header length lies": ("st:header_len_lies", False, "header length 1000000000000 is invalid"),
    "safetensors header cut short": ("st:header_cut", False, "claims"),
    "safetensors shape disagrees with offsets": ("st:shape_vs_offsets", False, "data_offsets span"),
    "NaN weights": ("st:nan", False, "contains NaN or Inf"),
    "Inf weights": ("st:inf", False, "contains NaN or Inf"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_hostile_model_refused(case, alice, inputs, files, settings) -> None:
    key, needs_manifest, reason = MODEL_CASES[case]
    before = job_count(settings)
    r, elapsed, extra = _post(alice, files[key], inputs.clean, json.dumps(inputs.manifest) if needs_manifest else None)
    assert r.status_code == 422, r.text
    assert reason in r.json()["detail"], r.json()["detail"]
    assert list(files["markers"].iterdir()) == [], "hostile code ran inside the API"
    assert elapsed < MAX_SECONDS and extra < MAX_EXTRA_RSS, (elapsed, extra >> 20)
    assert job_count(settings) == before


def test_hostile_pt2_detail_names_the_attack(alice, inputs, files) -> None:
    """Each .pt2 refusal says what was wrong (the engine's precise reasons survive the HTTP layer)."""
    expected = {"sample_inputs_pickle": "sample inputs", "use_pickle_weight": "pickle", "opaque_constant": "pickled",
                "legacy_weights": "legacy", "sympy_eval": "__import__", "guards_code": "guards_code",
                "aotinductor": "AOTInductor", "from_file_op": "reads files", "non_torch_target": "torch.hub.load",
                "injected_param_name": "plain dotted identifier", "huge_empty_weight": "empty",
                "truncated_weight": "truncated"}
    for variant, fragment in expected.items():
        r, _, _ = _post(alice, files[f"pt2:{variant}"], inputs.clean)
        assert r.status_code == 422 and fragment in r.json()["detail"], (variant, r.text)
    assert list(files["markers"].iterdir()) == []


def test_wrong_shapes_for_the_manifest(alice, inputs, files) -> None:
    r, _, _ = _post(alice, inputs.model_pt, inputs.clean, files["manifest_5_classes"])
    assert r.status_code == 422 and "classifier.weight' has shape (10," in r.json()["detail"], r.text


DATA_CASES = {
    "zip bomb (ratio)": ("zip_bomb", "compression ratio"),
    "zip bomb (declared size)": ("zip_bomb_big", "over the per-file limit"),
    "npz bomb": ("npz_bomb", "compression ratio"),
    "tar.gz bomb": ("tar_bomb", "per-file limit"),
    "zip path traversal": ("zip_traversal", "path traversal"),
    "tar path traversal": ("tar_traversal", "path traversal"),
    "tar absolute path": ("tar_absolute", "absolute path"),
    "zip symlink": ("zip_symlink", "not a regular file"),
    "tar symlink": ("tar_symlink", "symbolic link"),
    "tar hard link": ("tar_hardlink", "hard link"),
    "encrypted zip": ("zip_encrypted", "encrypted"),
    "huge image dimensions": ("huge_dims", "5000×4000 pixels, over the limit of 512"),
    "decompression-bomb image": ("pixel_bomb", "too large"),
    "20000 tiny files of the wrong size": ("many_tiny", "shape (C,H,W)=(3, 8, 8) but the model expects (3, 32, 32)"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_hostile_data_refused(case, alice, inputs, files, settings) -> None:
    key, reason = DATA_CASES[case]
    before = job_count(settings)
    r, elapsed, extra = _post(alice, inputs.model, files[key])
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("data: ") and reason in r.json()["detail"], r.json()["detail"]
    assert elapsed < MAX_SECONDS and extra < MAX_EXTRA_RSS, (elapsed, extra >> 20)
    assert job_count(settings) == before
