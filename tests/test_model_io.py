"""Model I/O: round trips for every format, and hostile model files.

The hostile ``.pt``/``.pt2`` files carry pickles (or strings torch would ``eval``/``exec``)
that create a marker file; each test asserts the marker never appears. For ``.pt2`` the
``test_plain_torch_export_load_is_unsafe`` controls show the same files *do* run code under a
plain ``torch.export.load`` in torch 2.13 — so the fixtures are real attacks, not strawmen.
"""
from __future__ import annotations

import json
import logging
import pickle
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hostile import pt2 as hostile_pt2
from hostile.pickles import evil_pickle, evil_torch_save, fresh_marker
from onp_core.models import ImageClassifier, ModelManifest, build_model
from onp_core.models.io import MANIFEST_KEY, ModelLoadError, detect_format, load_model, save_model
from model_helpers import randomise_bn

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(autouse=True, scope="module")
def _flush_denormals():
    """Random BN statistics make some activations denormal; CPU convs on denormals are ~100× slower."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def _model(arch: str, shape: tuple[int, int, int], num_classes: int = 10) -> ImageClassifier:
    torch.manual_seed(0)
    c = shape[0]
    man = ModelManifest(arch=arch, num_classes=num_classes, input_shape=shape, mean=(0.4,) * c, std=(0.25,) * c)
    return randomise_bn(build_model(man))


ROUND_TRIPS = [  # every format × several architectures, 1 and 3 channels, 28–64 px (kept small: CPU time)
    ("small_cnn", (1, 28, 28), "safetensors"), ("small_cnn", (1, 28, 28), "pt"), ("small_cnn", (1, 28, 28), "pt2"),
    ("small_cnn", (3, 32, 32), "safetensors"),
    ("preact_resnet18", (3, 32, 32), "safetensors"), ("preact_resnet18", (3, 32, 32), "pt2"),
    ("mobilenet_v2", (3, 64, 64), "pt"), ("mobilenet_v2", (1, 28, 28), "safetensors"),
]


@pytest.mark.parametrize("arch, shape, fmt", ROUND_TRIPS)
def test_round_trip_outputs_identical(tmp_path, arch, shape, fmt):
    model = _model(arch, shape)
    path = save_model(model, tmp_path / arch / f"model.{fmt}", fmt)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(1))
    loaded = load_model(path)
    assert loaded.format == fmt
    assert loaded.manifest.num_classes == 10 and tuple(loaded.manifest.input_shape) == shape
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    # the directory form finds the weights and manifest.json
    if arch == "small_cnn" and fmt != "pt2":
        with torch.no_grad():
            assert torch.equal(load_model(path.parent).model(x), model(x))


def test_detect_format():
    assert detect_format(Path("a.SAFETENSORS")) == "safetensors"
    assert detect_format(Path("a.pth")) == "pt"
    assert detect_format(Path("a.pt2")) == "pt2"
    with pytest.raises(ModelLoadError, match="unsupported model file extension '.onnx'"):
        detect_format(Path("a.onnx"))


# --------------------------------------------------------------------------- malicious pickles (.pt)


@pytest.mark.parametrize("payload", ["torch_save_zip", "raw_pickle"])
def test_malicious_pt_is_refused_and_never_runs(tmp_path, payload):
    marker = fresh_marker(tmp_path)
    path = tmp_path / "model.pt"
    path.write_bytes(evil_torch_save(marker) if payload == "torch_save_zip" else evil_pickle(marker))
    _model("small_cnn", (3, 32, 32)).manifest.save(tmp_path / "manifest.json")
    with pytest.raises(ModelLoadError, match="not a plain state_dict .* never executed"):
        load_model(path)
    assert not marker.exists()
    # control: the same file *does* run code under an unsafe load
    if payload == "torch_save_zip":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_pt_with_non_tensor_values_refused(tmp_path):
    man = _model("small_cnn", (3, 32, 32)).manifest
    torch.save({"conv.weight": torch.zeros(1), "epoch": 3}, tmp_path / "model.pt")
    with pytest.raises(ModelLoadError, match="mapping of names to tensors"):
        load_model(tmp_path / "model.pt", man)


# --------------------------------------------------------------------------- safetensors


@pytest.fixture(scope="module")
def small_st(tmp_path_factory) -> tuple[Path, bytes]:
    path = save_model(_model("small_cnn", (3, 32, 32)), tmp_path_factory.mktemp("st") / "model.safetensors")
    return path, path.read_bytes()


def _write(tmp_path: Path, data: bytes, name: str = "model.safetensors") -> Path:
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


def _header(data: bytes) -> dict:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n])


def _with_header(data: bytes, header: dict, body: bytes | None = None) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + (data[8 + n:] if body is None else body)


def test_safetensors_truncated_and_lying_headers(tmp_path, small_st):
    _, data = small_st
    n = struct.unpack("<Q", data[:8])[0]
    cases = [
        (data[:5], "only 5 bytes"),
        (data[: 8 + n // 2], "claims .* bytes but only"),
        (struct.pack("<Q", 10**12) + data[8:], "header length 1000000000000 is invalid"),
        (struct.pack("<Q", len(data)) + data[8:], "claims .* bytes but only"),
        (data[: len(data) - 100], "claims bytes .* data section has only"),
        (data + b"\0" * 16, "16 trailing bytes"),
        (struct.pack("<Q", 4) + b"nope" + data[8 + n:], "not valid JSON"),
    ]
    for blob, message in cases:
        with pytest.raises(ModelLoadError, match=message):
            load_model(_write(tmp_path, blob))


def test_safetensors_offsets_lie(tmp_path, small_st):
    _, data = small_st
    header = _header(data)
    key = "classifier.weight"
    bad = json.loads(json.dumps(header))
    bad[key]["shape"] = [s * 2 for s in bad[key]["shape"]]
    with pytest.raises(ModelLoadError, match=f"tensor '{key}' of shape .* needs .* bytes but its data_offsets span"):
        load_model(_write(tmp_path, _with_header(data, bad)))
    keys = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    bad = json.loads(json.dumps(header))
    first, second = keys[0][1], keys[1][1]
    bad[second]["data_offsets"] = bad[first]["data_offsets"]
    bad[second]["shape"], bad[second]["dtype"] = bad[first]["shape"], bad[first]["dtype"]
    with pytest.raises(ModelLoadError, match="overlaps another tensor|leaves a gap"):
        load_model(_write(tmp_path, _with_header(data, bad)))
    bad = json.loads(json.dumps(header))
    bad[key]["dtype"] = "OBJECT"
    with pytest.raises(ModelLoadError, match="unsupported dtype 'OBJECT'"):
        load_model(_write(tmp_path, _with_header(data, bad)))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path, value):
    model = _model("small_cnn", (3, 32, 32))
    with torch.no_grad():
        model.net.classifier.weight[0, 0] = value
    for fmt in ("safetensors", "pt"):
        path = save_model(model, tmp_path / fmt / f"model.{fmt}", fmt)
        with pytest.raises(ModelLoadError, match="'classifier.weight' contains NaN or Inf"):
            load_model(path)


def test_wrong_shapes_architecture_and_manifest(tmp_path):
    model = _model("small_cnn", (3, 32, 32))
    path = save_model(model, tmp_path / "model.safetensors")
    man = model.manifest
    with pytest.raises(ModelLoadError, match=r"'classifier.weight' has shape \(10, (\d+)\), .* expects \(5, \1\)"):
        load_model(path, man.model_copy(update={"num_classes": 5}))
    first_conv = r"'features.0.weight' has shape \((\d+), 3, 3, 3\), .* expects \(\1, 1, 3, 3\)"
    with pytest.raises(ModelLoadError, match=first_conv):
        load_model(path, man.model_copy(update={"input_shape": (1, 32, 32), "mean": (0.5,), "std": (0.5,)}))
    with pytest.raises(ModelLoadError, match="do not match architecture 'preact_resnet18': missing"):
        load_model(path, man.model_copy(update={"arch": "preact_resnet18"}))
    with pytest.raises(ModelLoadError, match="unknown architecture 'resnet9000'; known: .*small_cnn"):
        load_model(path, man.model_copy(update={"arch": "resnet9000"}))
    # no manifest anywhere
    state = {k: v.contiguous() for k, v in model.net.state_dict().items()}
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(state, str(bare / "weights.safetensors"))
    with pytest.raises(ModelLoadError, match="a manifest .* is required"):
        load_model(bare / "weights.safetensors")
    torch.save(state, bare / "weights.pt")
    with pytest.raises(ModelLoadError, match="a manifest .* is required"):
        load_model(bare / "weights.pt")
    # broken or invalid manifests
    save_file(state, str(bare / "m.safetensors"), metadata={MANIFEST_KEY: "{not json"})
    with pytest.raises(ModelLoadError, match="embedded in the weights file.* not valid JSON"):
        load_model(bare / "m.safetensors")
    bad_manifest = {"arch": "small_cnn", "num_classes": 10, "input_shape": [2, 32, 32]}
    (bare / "manifest.json").write_text(json.dumps(bad_manifest))
    with pytest.raises(ModelLoadError, match="manifest.json.* is invalid: input_shape: .*channels must be 1 or 3"):
        load_model(bare / "weights.pt")


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt2"])
def test_size_limit_checked_before_parsing(tmp_path, fmt):
    path = tmp_path / f"model.{fmt}"
    path.write_bytes(b"\0" * 5000)  # garbage: a parser would fail differently
    with pytest.raises(ModelLoadError, match="5000 bytes, over the limit of 4096 bytes"):
        load_model(path, max_bytes=4096)


# --------------------------------------------------------------------------- .pt2


class ResidualCNN(nn.Module):
    """Not in the registry: a stem, one residual block with a projection skip, a head."""

    def __init__(self, in_ch: int = 3, num_classes: int = 7):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.skip = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) / 0.25  # normalisation inside the program
        h = self.stem(x)
        h = torch.relu(self.block(h) + self.skip(h))
        return self.head(h.mean((2, 3)))


def _export(module: nn.Module, shape: tuple[int, int, int], path: Path, dynamic: bool = True) -> Path:
    example = (torch.rand(2, *shape),)
    dyn = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic else None
    torch.export.save(torch.export.export(module.eval(), example, dynamic_shapes=dyn), str(path))
    return path


@pytest.fixture(scope="module")
def residual_pt2(tmp_path_factory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    net = randomise_bn(ResidualCNN())
    path = _export(net, (3, 32, 32), tmp_path_factory.mktemp("pt2") / "residual.pt2")
    return path, net


def test_pt2_unknown_architecture_with_residual_block(tmp_path, residual_pt2):
    path, net = residual_pt2
    loaded = load_model(path)
    assert loaded.format == "pt2" and loaded.manifest.arch == "exported"
    assert loaded.manifest.num_classes == 7 and tuple(loaded.manifest.input_shape) == (3, 32, 32)
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), net(x), atol=1e-5)
    # modify (prune one channel as a defense would), re-export, reload: same outputs
    with torch.no_grad():
        weights = [p for name, p in loaded.model.net.named_parameters() if p.ndim == 4]
        weights[1][3].zero_()
        expected = loaded.model(x)
    again = load_model(save_model(loaded.model, tmp_path / "pruned.pt2", "pt2"))
    with torch.no_grad():
        assert torch.allclose(again.model(x), expected, atol=1e-6)
        assert not torch.allclose(again.model(x), net(x), atol=1e-4)


def test_pt2_manifest_mismatch_and_static_batch(tmp_path, residual_pt2):
    path, net = residual_pt2
    wrong = ModelManifest(arch="exported", num_classes=10, input_shape=(3, 32, 32))
    with pytest.raises(ModelLoadError, match=r"the program takes \(3, 32, 32\) and outputs 7 classes"):
        load_model(path, wrong)
    static = _export(net, (3, 32, 32), tmp_path / "static.pt2", dynamic=False)
    with pytest.raises(ModelLoadError, match="does not run on a batch of 1 .* dynamic batch"):
        load_model(static)


HOSTILE_PT2 = {
    "sample_inputs_pickle": "sample inputs are not plain tensors",
    "use_pickle_weight": "stored as a pickle",
    "opaque_constant": "unexpected member 'data/constants/opaque_obj_0' \\(pickled objects\\)",
    "legacy_weights": "unexpected member 'data/weights/model.pt' \\(legacy pickled weights\\)",
    "sympy_eval": "symbolic shape expression using '__import__'",
    "guards_code": "guards_code",
    "aotinductor": "AOTInductor",
    "from_file_op": "reads files",
    "non_torch_target": "it calls 'torch.hub.load'",
    "injected_param_name": "is not a plain dotted identifier",
    "huge_empty_weight": "record is empty",
    "truncated_weight": "truncated or lying metadata",
}


@pytest.mark.parametrize("variant", sorted(HOSTILE_PT2))
def test_hostile_pt2_refused_and_never_runs(tmp_path, residual_pt2, variant):
    marker = fresh_marker(tmp_path)
    path = hostile_pt2.make_variant(residual_pt2[0], tmp_path / "evil.pt2", variant, marker)
    with pytest.raises(ModelLoadError, match=HOSTILE_PT2[variant]):
        load_model(path)
    assert not marker.exists()


def test_hostile_pt2_legacy_layout_and_bad_archives(tmp_path, residual_pt2):
    marker = fresh_marker(tmp_path)
    with pytest.raises(ModelLoadError, match="legacy"):
        load_model(hostile_pt2.legacy_archive(tmp_path / "legacy.pt2", marker))
    assert not marker.exists()
    root, members = hostile_pt2.read_members(residual_pt2[0])
    import zipfile

    deflated = hostile_pt2.write_members(tmp_path / "deflated.pt2", root, members, zipfile.ZIP_DEFLATED)
    with pytest.raises(ModelLoadError, match="compressed or encrypted"):
        load_model(deflated)
    (tmp_path / "junk.pt2").write_bytes(b"not a zip" * 100)
    with pytest.raises(ModelLoadError, match="not a valid zip"):
        load_model(tmp_path / "junk.pt2")
    traversal = dict(members)
    traversal["../../evil"] = b"x"
    with pytest.raises(ModelLoadError, match="unexpected member|one root folder"):
        load_model(hostile_pt2.write_members(tmp_path / "trav.pt2", root, traversal))


@pytest.mark.parametrize("variant, stage", [
    ("sample_inputs_pickle", "load"), ("use_pickle_weight", "load"), ("opaque_constant", "load"),
    ("legacy_weights", "load"), ("sympy_eval", "load"), ("guards_code", "call"),
])
def test_plain_torch_export_load_is_unsafe(tmp_path, residual_pt2, variant, stage):
    """Control (torch 2.13): the same files run code under plain ``torch.export.load``.

    If this starts failing after a torch upgrade, torch has closed the hole: re-read
    ``onp_core/models/exported.py``'s docstring and update it.
    """
    marker = fresh_marker(tmp_path)
    path = hostile_pt2.make_variant(residual_pt2[0], tmp_path / "evil.pt2", variant, marker)
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                program = torch.export.load(str(path))
                if stage == "call":
                    program.module()(torch.rand(2, 3, 32, 32))
            except Exception:
                pass  # many variants crash *after* the code already ran
    finally:
        logging.disable(logging.NOTSET)
    assert marker.exists(), f"{variant}: plain torch.export.load no longer runs the payload"
