"""Clean-data upload readers: real CIFAR-10 images in .zip/.tar/.npz, and hostile uploads.

Every hostile upload must end in a ``DataFormatError`` with a precise message — never a
crash, a hang, a file written to disk or a pickle executed.
"""
from __future__ import annotations

import io
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hostile.archives import (encode, png_with_declared_size, special_tarinfo, write_tar, write_zip,
                              zip_symlink, zip_with_encrypted_flag, zip_with_lying_size)
from hostile.pickles import MarkerWriter, fresh_marker
from onp_core.data import balanced_subset, load_dataset
from onp_core.data.uploads import DataFormatError, UploadLimits, read_clean_data

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cifar():
    """50 real CIFAR-10 test images, 5 per class."""
    try:
        test = load_dataset("cifar10", "test")
    except FileNotFoundError as exc:  # pragma: no cover - data missing on this machine
        pytest.skip(str(exc))
    return balanced_subset(test, 50, seed=3)


def _class_zip(tmp_path: Path, cifar, fmt: str = "PNG", prefix: str = "", numeric: bool = False,
               name: str = "clean.zip") -> tuple[Path, np.ndarray, np.ndarray]:
    """A zip of class folders; returns it with the images/labels in the reader's (path-sorted) order."""
    x, y = cifar.images.numpy(), cifar.labels.numpy()
    members, order = {}, []
    for i, (img, lab) in enumerate(zip(x, y)):
        folder = str(int(lab)) if numeric else cifar.class_names[lab]
        path = f"{prefix}{folder}/{i:04d}.{fmt.lower().replace('jpeg', 'jpg')}"
        members[path] = encode(img, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        order.append((path, i))
    idx = [i for _, i in sorted(order)]
    return write_zip(tmp_path / name, members), x[idx], y[idx]


# --------------------------------------------------------------------------- real data, happy paths


def test_zip_of_png_class_folders_is_pixel_exact(tmp_path, cifar):
    path, x, y = _class_zip(tmp_path, cifar)
    data = read_clean_data(path, num_classes=10, expected_shape=(3, 32, 32))
    assert data.images.dtype == torch.uint8 and data.shape == (3, 32, 32) and len(data) == 50
    assert np.array_equal(data.images.numpy(), x)
    assert np.array_equal(data.labels.numpy(), y)
    assert data.class_names == sorted(cifar.class_names)  # CIFAR-10 class names are already sorted


def test_tar_gz_of_jpeg_numeric_folders(tmp_path, cifar):
    x, y = cifar.images.numpy(), cifar.labels.numpy()
    members = {f"upload/{int(lab)}/{i:04d}.jpeg": encode(img, "JPEG", quality=95)
               for i, (img, lab) in enumerate(zip(x, y))}
    path = write_tar(tmp_path / "clean.tar.gz", members)
    data = read_clean_data(path, num_classes=10)
    order = sorted(range(len(y)), key=lambda i: f"{int(y[i])}/{i:04d}")
    assert np.array_equal(data.labels.numpy(), y[order])
    assert data.class_names is None  # numeric folders are indices
    diff = np.abs(data.images.numpy().astype(int) - x[order].astype(int)).mean()
    assert diff < 3.0, diff  # JPEG is lossy, but only slightly at quality 95


@pytest.mark.parametrize("mode", ["w", "w:bz2", "w:xz"])
def test_tar_variants(tmp_path, cifar, mode):
    x, y = cifar.images.numpy()[:10], cifar.labels.numpy()[:10]
    members = {f"{cifar.class_names[lab]}/{i}.png": encode(img) for i, (img, lab) in enumerate(zip(x, y))}
    suffix = {"w": ".tar", "w:bz2": ".tar.bz2", "w:xz": ".tar.xz"}[mode]
    data = read_clean_data(write_tar(tmp_path / f"c{suffix}", members, mode))
    assert len(data) == 10 and data.shape == (3, 32, 32)


def test_cifar_style_split_folders(tmp_path, cifar):
    x, y = cifar.images.numpy(), cifar.labels.numpy()
    members, seen = {}, set()
    for i, (img, lab) in enumerate(zip(x, y)):
        split = "train" if int(lab) in seen else "test"  # one test image per class
        seen.add(int(lab))
        members[f"cifar10/{split}/{cifar.class_names[lab]}/{i:04d}.png"] = encode(img)
    members["cifar10/README.txt"] = b"CIFAR-10"
    members["__MACOSX/cifar10/._README.txt"] = b"junk"
    members["cifar10/train/.DS_Store"] = b"junk"
    path = write_zip(tmp_path / "cifar.zip", members)
    train = read_clean_data(path, num_classes=10)
    assert len(train) == 40 and train.meta["split"] == "train"
    test = read_clean_data(path, num_classes=10, split="test")
    assert len(test) == 10 and test.meta["split"] == "test"
    with pytest.raises(DataFormatError, match="split 'val' is not in the archive"):
        read_clean_data(path, split="val")


def test_greyscale_images_converted_to_model_channels(tmp_path, cifar):
    grey = cifar.images.float().mean(1, keepdim=True).round().to(torch.uint8).numpy()[:10]
    members = {f"{int(lab)}/{i}.png": encode(img) for i, (img, lab) in enumerate(zip(grey, cifar.labels.numpy()))}
    path = write_zip(tmp_path / "grey.zip", members)
    as_grey = read_clean_data(path)
    assert as_grey.shape == (1, 32, 32)
    as_rgb = read_clean_data(path, expected_shape=(3, 32, 32))
    assert as_rgb.shape == (3, 32, 32)
    assert torch.equal(as_rgb.images[:, 0], as_rgb.images[:, 2])
    assert torch.equal(as_rgb.images[:, :1], as_grey.images)
    rgb_path, _, _ = _class_zip(tmp_path, cifar, name="rgb.zip")
    assert read_clean_data(rgb_path, expected_shape=(1, 32, 32)).shape == (1, 32, 32)


@pytest.mark.parametrize("layout", ["nhwc", "nchw", "nhw"])
def test_npz_layouts(tmp_path, cifar, layout):
    x, y = cifar.images.numpy(), cifar.labels.numpy()
    if layout == "nhw":
        x = x[:, 0]
    arr = x.transpose(0, 2, 3, 1) if layout == "nhwc" else x
    np.savez_compressed(tmp_path / "c.npz", x=arr, y=y.astype(np.uint8))
    data = read_clean_data(tmp_path / "c.npz", num_classes=10)
    expect = x[:, None] if layout == "nhw" else x
    assert np.array_equal(data.images.numpy(), expect) and np.array_equal(data.labels.numpy(), y)


def test_npz_float_in_unit_range_is_converted(tmp_path, cifar):
    x, y = cifar.images.numpy(), cifar.labels.numpy()
    np.savez(tmp_path / "f.npz", x=x.astype(np.float32) / 255.0, y=y)
    data = read_clean_data(tmp_path / "f.npz", expected_shape=(3, 32, 32))
    assert np.array_equal(data.images.numpy(), x)
    np.savez(tmp_path / "i.npz", x=x.astype(np.int64), y=y)
    assert np.array_equal(read_clean_data(tmp_path / "i.npz").images.numpy(), x)


# --------------------------------------------------------------------------- npz errors


def _npz(tmp_path: Path, **arrays) -> Path:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


X = np.zeros((4, 3, 8, 8), np.uint8)
Y = np.arange(4)


@pytest.mark.parametrize("arrays, message", [
    (dict(x=X.astype(bool), y=Y), "images must be uint8"),
    (dict(x=X.astype(np.complex64), y=Y), "images must be uint8"),
    (dict(x=X.astype(np.float32) + 2.0, y=Y), r"float images must be in \[0, 1\]"),
    (dict(x=np.full((4, 3, 8, 8), np.nan, np.float32), y=Y), "NaN"),
    (dict(x=X.astype(np.int16) - 1, y=Y), "integer images must be in 0..255"),
    (dict(x=X, y=np.arange(5)), "x has 4 images but y has 5 labels"),
    (dict(x=np.zeros((4, 64), np.uint8), y=Y), "got 2 dimensions"),
    (dict(x=np.zeros((4, 1, 3, 8, 8), np.uint8), y=Y), "got 5 dimensions"),
    (dict(x=np.zeros((4, 4, 8, 8), np.uint8), y=Y), "1 \\(greyscale\\) or 3 \\(RGB\\) channels"),
    (dict(x=np.zeros((4, 3, 8, 3), np.uint8), y=Y), "ambiguous"),
    (dict(x=X, y=Y.astype(np.float32)), "labels must be integers"),
    (dict(x=X, y=np.eye(4, dtype=np.int64)), "one-hot"),
    (dict(x=X, y=Y - 1), "labels must be >= 0"),
    (dict(x=X, y=Y + 10), "label 13 is out of range: the model has 10 classes"),
    (dict(x=X), r"lacks array\(s\) \['y'\]"),
    (dict(x=X, y=Y, z=Y), "unexpected arrays"),
    (dict(x=X[:0], y=Y[:0]), "no images"),
    (dict(x=np.array(["a", "b"]), y=Y[:2]), "only numeric arrays"),
])
def test_npz_errors(tmp_path, arrays, message):
    with pytest.raises(DataFormatError, match=message):
        read_clean_data(_npz(tmp_path, **arrays), num_classes=10)


def test_npz_object_array_is_never_unpickled(tmp_path):
    marker = fresh_marker(tmp_path)
    x = np.empty(1, dtype=object)
    x[0] = MarkerWriter(marker)
    path = _npz(tmp_path, x=x, y=np.zeros(1, np.int64))
    with pytest.raises(DataFormatError, match="object"):
        read_clean_data(path)
    assert not marker.exists()


def test_npz_expected_shape_message(tmp_path):
    path = _npz(tmp_path, x=np.zeros((2, 28, 28), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(DataFormatError, match="^images are 28×28×1, the model expects 32×32×3$"):
        read_clean_data(path, expected_shape=(3, 32, 32))


def test_npz_header_lies_about_shape(tmp_path):
    """A .npy header declaring far more data than the member holds is refused before allocating."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (10**6, 3, 512, 512)})
    buf.write(b"\0" * 100)
    with zipfile.ZipFile(tmp_path / "lie.npz", "w") as z:
        z.writestr("x.npy", buf.getvalue())
        ybuf = io.BytesIO()
        np.save(ybuf, np.zeros(1, np.int64))
        z.writestr("y.npy", ybuf.getvalue())
    with pytest.raises(DataFormatError, match="over the limit|truncated"):
        read_clean_data(tmp_path / "lie.npz")
    small = UploadLimits(max_total_bytes=10**13)
    with pytest.raises(DataFormatError, match="truncated or padded"):
        read_clean_data(tmp_path / "lie.npz", small)


def test_npz_zip_bomb_ratio(tmp_path):
    np.savez_compressed(tmp_path / "bomb.npz", x=np.zeros((400, 3, 64, 64), np.uint8), y=np.zeros(400, np.int64))
    with pytest.raises(DataFormatError, match="compression ratio"):
        read_clean_data(tmp_path / "bomb.npz")


# --------------------------------------------------------------------------- archive errors


PNG8 = encode(np.zeros((3, 8, 8), np.uint8))


@pytest.mark.parametrize("name, message", [
    ("../evil.png", "path traversal"),
    ("cat/../../evil.png", "path traversal"),
    ("/etc/evil.png", "absolute path"),
    ("C:/evil.png", "absolute path"),
    ("cat\\evil.png", "backslashes"),
])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_archive_path_traversal(tmp_path, name, message, kind):
    members = {"cat/ok.png": PNG8, name: PNG8}
    path = write_zip(tmp_path / "t.zip", members) if kind == "zip" else write_tar(tmp_path / "t.tar", members, "w")
    with pytest.raises(DataFormatError, match=message):
        read_clean_data(path)


@pytest.mark.parametrize("kind, message", [
    (tarfile.SYMTYPE, "symbolic link"),
    (tarfile.LNKTYPE, "hard link"),
    (tarfile.CHRTYPE, "device"),
    (tarfile.BLKTYPE, "device"),
    (tarfile.FIFOTYPE, "FIFO"),
])
def test_tar_special_members(tmp_path, kind, message):
    extra = [special_tarinfo("cat/link.png", kind, "/etc/passwd")]
    path = write_tar(tmp_path / "s.tar.gz", {"cat/ok.png": PNG8}, extra=extra)
    with pytest.raises(DataFormatError, match=message):
        read_clean_data(path)


def test_zip_symlink_and_encrypted(tmp_path):
    with pytest.raises(DataFormatError, match="not a regular file"):
        read_clean_data(zip_symlink(tmp_path / "l.zip", "cat/x.png", "/etc/passwd"))
    with pytest.raises(DataFormatError, match="encrypted"):
        read_clean_data(zip_with_encrypted_flag(tmp_path / "e.zip", "cat/x.png", PNG8))


def test_zip_bomb_declared_ratio(tmp_path):
    big = np.zeros((3, 512, 512), np.uint8)
    path = write_zip(tmp_path / "b.zip", {"cat/a.bmp": encode(big, "BMP")})  # 768 KiB of zeros
    with pytest.raises(DataFormatError, match="per-file limit"):
        read_clean_data(path, UploadLimits(max_member_bytes=100_000))
    huge = b"\0" * (8 << 20)
    path = write_zip(tmp_path / "b2.zip", {"cat/a.bmp": huge})
    with pytest.raises(DataFormatError, match="compression ratio"):
        read_clean_data(path)


def test_zip_header_lies_about_size(tmp_path):
    """Declared size smaller than the real data: the reader stops at the declared size and the CRC fails."""
    path = zip_with_lying_size(tmp_path / "lie.zip", "cat/a.png", PNG8 + b"\0" * 5000, declared=len(PNG8))
    with pytest.raises(DataFormatError, match="corrupt"):
        read_clean_data(path)


def test_tar_bomb_is_stopped_while_streaming(tmp_path):
    path = write_tar(tmp_path / "bomb.tar.gz", {"cat/a.png": PNG8, "cat/b.bmp": b"\0" * (12 << 20)})
    t = time.monotonic()
    with pytest.raises(DataFormatError, match="decompresses to more than"):
        read_clean_data(path, UploadLimits(max_archive_bytes=4 << 20, max_member_bytes=64 << 20))
    assert time.monotonic() - t < 5
    with pytest.raises(DataFormatError, match="per-file limit"):
        read_clean_data(path, UploadLimits(max_member_bytes=1 << 20))


def test_too_many_members(tmp_path):
    members = {f"cat/{i}.png": PNG8 for i in range(300)}
    with pytest.raises(DataFormatError, match="300 entries, over the limit of 100"):
        read_clean_data(write_zip(tmp_path / "m.zip", members), UploadLimits(max_members=100))
    with pytest.raises(DataFormatError, match="more than 100 entries"):
        read_clean_data(write_tar(tmp_path / "m.tar", members, "w"), UploadLimits(max_members=100))
    with pytest.raises(DataFormatError, match="over the limit of 50"):
        read_clean_data(write_zip(tmp_path / "m2.zip", members), UploadLimits(max_images=50))


def test_huge_image_dimensions_checked_from_header(tmp_path):
    path = write_zip(tmp_path / "h.zip", {"cat/a.png": png_with_declared_size(5000, 4000)})
    with pytest.raises(DataFormatError, match="5000×4000 pixels, over the limit of 512"):
        read_clean_data(path)
    bomb = write_zip(tmp_path / "b.zip", {"cat/a.png": png_with_declared_size(100_000, 100_000)})
    for limits in (UploadLimits(), UploadLimits(max_side=1_000_000)):
        with pytest.raises(DataFormatError, match="too large"):  # PIL's own decompression-bomb guard
            read_clean_data(bomb, limits)


def test_truncated_and_corrupt_images(tmp_path):
    img = encode(np.random.default_rng(0).integers(0, 255, (3, 32, 32), dtype=np.uint8))
    with pytest.raises(DataFormatError, match="'cat/a.png' is corrupt or truncated"):
        read_clean_data(write_zip(tmp_path / "t.zip", {"cat/a.png": img[: len(img) // 2]}))
    with pytest.raises(DataFormatError, match="not a readable image"):
        read_clean_data(write_zip(tmp_path / "c.zip", {"cat/a.png": b"definitely not an image" * 10}))


@pytest.mark.parametrize("members, message", [
    ({"cat/a.png": PNG8, "cat/run.exe": b"MZ"}, "unsupported type '.exe'"),
    ({"cat/a.png": PNG8, "cat/notes.txt": b"hi"}, "inside a class folder is not an image"),
    ({"0/a.png": PNG8, "1/b.png": encode(np.zeros((3, 9, 8), np.uint8))}, "images differ in size: '0/a.png' is 8×8"),
    ({"cat/a.png": PNG8, "dog/": None}, "class folder 'dog' contains no images"),
    ({"README.txt": b"nothing here"}, "contains no images"),
    ({"a.png": PNG8, "cat/b.png": PNG8}, "not inside a class folder"),
    ({"cat/a.png": PNG8, "cat/sub/b.png": PNG8}, "nested inside a class folder"),
    ({"cat/a.png": PNG8, "dog/b.png": PNG8}, "2 class folders .* but the model has 10 classes"),
    ({"3/a.png": PNG8, "12/b.png": PNG8}, "class folder '12' is out of range"),
])
def test_archive_layout_errors(tmp_path, members, message):
    with pytest.raises(DataFormatError, match=message):
        read_clean_data(write_zip(tmp_path / "l.zip", members), num_classes=10)


def test_archive_expected_shape_message(tmp_path):
    path = write_zip(tmp_path / "g.zip", {"0/a.png": encode(np.zeros((1, 28, 28), np.uint8))})
    with pytest.raises(DataFormatError, match="^images are 28×28×1, the model expects 32×32×3$"):
        read_clean_data(path, expected_shape=(3, 32, 32))


def test_numeric_subset_of_classes(tmp_path):
    data = read_clean_data(write_zip(tmp_path / "n.zip", {"7/a.png": PNG8, "2/b.png": PNG8}), num_classes=10)
    assert sorted(data.labels.tolist()) == [2, 7]


def test_not_an_archive_and_unknown_format(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"this is not a zip file at all")
    with pytest.raises(DataFormatError, match="not a zip archive"):
        read_clean_data(tmp_path / "x.zip")
    (tmp_path / "x.tar.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 20)
    with pytest.raises(DataFormatError, match="corrupt or truncated|not a valid tar"):
        read_clean_data(tmp_path / "x.tar.gz")
    (tmp_path / "x.rar").write_bytes(b"Rar!")
    with pytest.raises(DataFormatError, match="unsupported clean-data format"):
        read_clean_data(tmp_path / "x.rar")
    (tmp_path / "empty.zip").write_bytes(b"")
    with pytest.raises(DataFormatError, match="empty"):
        read_clean_data(tmp_path / "empty.zip")


def test_upload_size_and_time_limits(tmp_path, cifar):
    path, _, _ = _class_zip(tmp_path, cifar)
    with pytest.raises(DataFormatError, match="over the limit of 1000"):
        read_clean_data(path, UploadLimits(max_upload_bytes=1000))
    with pytest.raises(DataFormatError, match="took longer than the limit"):
        read_clean_data(path, UploadLimits(max_seconds=0))


def test_nothing_is_written_to_disk(tmp_path, cifar, monkeypatch):
    path, _, _ = _class_zip(tmp_path, cifar)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    read_clean_data(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
