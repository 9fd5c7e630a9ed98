"""Bad uploads are refused before anything is stored or queued, each with a precise reason."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from conftest import Inputs, job_count, submit, write_npz
from model_helpers import save_linear_pt2

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory, inputs: Inputs) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    files = {}
    files["txt_model"] = root / "model.txt"
    files["txt_model"].write_bytes(b"not a model")
    files["junk_safetensors"] = root / "junk.safetensors"
    files["junk_safetensors"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    files["pickle_pt"] = root / "evil.pt"
    files["pickle_pt"].write_bytes(pickle.dumps({"net.w": object()}))
    files["huge_model"] = root / "huge.safetensors"
    files["huge_model"].write_bytes(b"\0" * (5 << 20))  # over the 4 MiB test limit
    images = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8)
    files["grey_28"] = write_npz(root / "grey.npz", images, torch.arange(20) % 10)
    rgb = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    files["labels_11"] = write_npz(root / "labels.npz", rgb, torch.arange(20) % 12)
    files["negative"] = write_npz(root / "negative.npz", rgb, torch.arange(20) % 10 - 1)
    files["no_y"] = root / "no_y.npz"
    np.savez(files["no_y"], x=rgb.numpy())
    files["csv"] = root / "data.csv"
    files["csv"].write_text("1,2,3\n")
    files["empty"] = root / "empty.npz"
    files["empty"].write_bytes(b"")
    files["linear"] = root / "linear.pt2"
    save_linear_pt2(files["linear"])
    return files


CLP = {"method": "clp"}

CASES = {
    # name: (model key or None for the good one, data key or None, options, extra, status, reason fragment)
    "wrong model extension": ("txt_model", None, CLP, {}, 422, "unsupported model file extension"),
    "corrupt safetensors": ("junk_safetensors", None, CLP, {}, 422, "not a valid safetensors"),
    "pickle in .pt": ("pickle_pt", None, CLP, {"manifest": "MANIFEST"}, 422, "refused to load"),
    "model with nothing to prune": ("linear", None, CLP, {}, 422, "no hidden neurons to prune"),
    "pt without manifest": ("PT", None, CLP, {}, 422, "manifest"),
    "oversized model": ("huge_model", None, CLP, {}, 413, "'model' exceeds the limit"),
    "shape mismatch": (None, "grey_28", CLP, {}, 422, "shape (C,H,W)=(1, 28, 28) but the model expects (3, 32, 32)"),
    "label out of range": (None, "labels_11", CLP, {}, 422, "label"),
    "negative label": (None, "negative", CLP, {}, 422, "labels must be"),
    "npz without labels": (None, "no_y", CLP, {}, 422, "data:"),
    "unsupported data format": (None, "csv", CLP, {}, 422, "data:"),
    "empty data": (None, "empty", CLP, {}, 422, "'data' file"),
    "options not JSON": (None, None, "{method: clp", {}, 422, "options is not valid JSON"),
    "options not an object": (None, None, "[1, 2]", {}, 422, "options must be a JSON object"),
    "unknown method": (None, None, {"method": "magic"}, {}, 422, "unknown method 'magic'"),
    "unknown option key": (None, None, {"method": "clp", "colour": 1}, {}, 422, "options.colour"),
    "bad method option": (None, None, {"method": "clp", "options": {"u": "lots"}}, {}, 422, "options.options.u"),
    "bad device": (None, None, {"method": "clp", "device": "tpu"}, {}, 422, "options.device"),
    "triggered without target": (None, None, CLP, {"triggered": "CLEAN"}, 422, "needs 'target'"),
    "target out of range": (None, None, {"method": "clp", "target": 10}, {}, 422, "target 10 is out of range"),
    "bad manifest": ("PT", None, CLP, {"manifest": '{"arch": "small_cnn"}'}, 422, "manifest.num_classes"),
    "unknown field": (None, None, CLP, {"colour": "red"}, 422, "unknown form field 'colour'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_upload_is_refused(case: str, alice: httpx.Client, inputs: Inputs, bad: dict[str, Path], settings
                               ) -> None:
    model_key, data_key, options, extra, status, reason = CASES[case]
    model = inputs.model_pt if model_key == "PT" else bad[model_key] if model_key else inputs.model
    data = bad[data_key] if data_key else inputs.clean
    extra = {k: (json.dumps(inputs.manifest) if v == "MANIFEST" else inputs.clean if v == "CLEAN" else v)
             for k, v in extra.items()}
    before = job_count(settings)
    files = {"model": (model.name, model.read_bytes()), "data": (data.name, data.read_bytes())}
    files["options"] = (None, options if isinstance(options, str) else json.dumps(options))
    for k, v in extra.items():
        files[k] = (v.name, v.read_bytes()) if isinstance(v, Path) else (None, v)
    r = alice.post("/v1/repairs", files=files)
    assert r.status_code == status, r.text
    assert reason in r.json()["detail"], r.json()["detail"]
    assert job_count(settings) == before


def test_not_multipart(alice: httpx.Client) -> None:
    r = alice.post("/v1/repairs", json={"model": "x"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]


def test_declared_body_too_large(server, keys) -> None:
    """A 1 TiB Content-Length is refused from the headers alone, before any of the body is read."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(f"POST /v1/repairs HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {keys.alice}\r\n"
                     f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {1 << 40}\r\n\r\n".encode())
        reply = b""
        while not reply.endswith(b"}") and (chunk := sock.recv(65536)):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"exceeds the limit" in reply


def test_state_dict_with_manifest_is_accepted(alice: httpx.Client, inputs: Inputs, worker: object) -> None:
    r = submit(alice, inputs.model_pt, inputs.clean, {"method": "slow", "options": {"steps": 1, "delay": 0}},
               manifest=json.dumps(inputs.manifest))
    assert r.status_code == 202, r.text
    assert r.json()["model_format"] == "pt"
