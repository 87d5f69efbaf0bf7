"""Registered training sets (``workers.datasets``) and influence on a user model with an
ImageFolder training set, loaded through the model registry like any job."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from schemas.errors import BadParams, JobFailure
from schemas.influence import InfluenceParams
from schemas.models import ModelManifest, Preprocessing, TrainingSet
from workers.datasets import TrainingSetData, load_training_set


def test_builtin_digits():
    from workers.models.digits import load_split

    manifest = ModelManifest(
        id="d", architecture="digits_cnn", weights="w.safetensors",
        preprocessing=Preprocessing(size=(8, 8), mode="L"), labels=[str(k) for k in range(10)],
        training_set=TrainingSet(kind="builtin", name="sklearn-digits"),
    )
    data = load_training_set(manifest, None)
    x, y, _, _ = load_split()
    assert len(data) == 1437 and np.array_equal(data.labels, y)
    assert torch.equal(data.images(slice(0, 5)), torch.from_numpy(x[:5])[:, None])
    assert torch.equal(data.images(np.array([7, 3])), torch.from_numpy(x[[7, 3]])[:, None])
    assert data.display(0).shape == (8, 8, 3) and data.display(0).dtype == np.uint8
    assert len(data.fingerprint) == 64 and load_training_set(manifest, None).fingerprint == data.fingerprint
    starts = [s for s, _, _ in data.batches(500)]
    assert starts == [0, 500, 1000]


def _write_png(path: Path, rgb: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), rgb, np.uint8)).save(path)


def _folder_manifest(labels: list[str]) -> ModelManifest:
    return ModelManifest(
        id="folder-model", architecture="torchvision", arch_name="resnet18", arch_kwargs={"num_classes": len(labels)},
        weights="weights.safetensors", preprocessing=Preprocessing(size=(4, 4)), labels=labels,
        training_set=TrainingSet(kind="imagefolder", path="train"),
    )


def test_image_folder_maps_folder_names_to_labels(tmp_path):
    _write_png(tmp_path / "train" / "cat" / "a.png", (255, 0, 0))
    _write_png(tmp_path / "train" / "cat" / "b.png", (0, 255, 0))
    _write_png(tmp_path / "train" / "dog" / "c.png", (0, 0, 255))
    manifest = _folder_manifest(["dog", "cat"])  # not sorted: names decide the index
    data = load_training_set(manifest, tmp_path)
    assert len(data) == 3 and data.labels.tolist() == [1, 1, 0]
    x = data.images(slice(0, 3))
    assert x.shape == (3, 3, 4, 4)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert data.display(2)[0, 0].tolist() == [0, 0, 255]
    before = data.fingerprint
    assert load_training_set(manifest, tmp_path) is data  # cached while unchanged
    path = tmp_path / "train" / "dog" / "c.png"
    _write_png(path, (9, 9, 9))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    fresh = load_training_set(manifest, tmp_path)
    assert fresh.fingerprint != before and fresh.display(2)[0, 0].tolist() == [9, 9, 9]


def test_image_folder_by_count_and_errors(tmp_path):
    _write_png(tmp_path / "train" / "b" / "1.png", (1, 2, 3))
    _write_png(tmp_path / "train" / "a" / "2.png", (4, 5, 6))
    data = load_training_set(_folder_manifest(["x", "y"]), tmp_path)  # sorted folders -> label order
    assert data.labels.tolist() == [0, 1]  # a/2.png first
    with pytest.raises(JobFailure, match="neither by name nor by count"):
        load_training_set(_folder_manifest(["x", "y", "z"]), tmp_path)
    with pytest.raises(JobFailure, match="missing"):
        load_training_set(_folder_manifest(["x", "y"]), tmp_path / "nowhere")
    no_set = _folder_manifest(["x", "y"]).model_copy(update={"training_set": None})
    with pytest.raises(BadParams, match="no training set"):
        load_training_set(no_set, tmp_path)


def test_from_tensors():
    x = torch.rand(4, 1, 3, 3)
    data = TrainingSetData.from_tensors(x, torch.tensor([0, 1, 0, 1]))
    assert data.display(1).shape == (3, 3, 3) and data.labels.tolist() == [0, 1, 0, 1]
    assert TrainingSetData.from_tensors(x, torch.tensor([0, 1, 0, 1])).fingerprint == data.fingerprint
    assert TrainingSetData.from_tensors(x + 1, torch.tensor([0, 1, 0, 1])).fingerprint != data.fingerprint


def test_influence_on_a_user_model_with_an_image_folder(tmp_path):
    """A torchvision resnet18 user model (BatchNorm layers) with an ImageFolder training set,
    through ModelCache and the kind's context: the folder image that duplicates the test image
    is its most helpful training image."""
    from safetensors.torch import save_file

    from workers.explain import influence as inf
    from workers.explain.base import Inputs, no_progress
    from workers.pipeline import JobContext, load_inputs
    from workers.registry import ModelCache

    torch.manual_seed(0)
    import torchvision

    module = torchvision.models.resnet18(num_classes=2)
    d = tmp_path / "models" / "folder-model"
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(d / "weights.safetensors"))
    manifest = _folder_manifest(["cat", "dog"]).model_copy(update={"preprocessing": Preprocessing(size=(32, 32))})
    (d / "manifest.json").write_text(manifest.model_dump_json())
    rng = np.random.default_rng(0)
    pictures = []
    for i in range(8):
        rgb = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        pictures.append(rgb)
        folder = d / "train" / ("cat" if i % 2 == 0 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(folder / f"{i}.png")
    cache = ModelCache(tmp_path / "models", tmp_path / "cache", device="cpu", onnx=False)
    model = cache.get("folder-model")
    import io

    buf = io.BytesIO()
    Image.fromarray(pictures[3]).save(buf, format="PNG")
    params = InfluenceParams(layers=["fc", "bn1"], solver="exact", target=1, top_k=2)
    inputs: Inputs = load_inputs(model, [buf.getvalue()], params)
    result = inf.run(model, inputs, params, no_progress, context=JobContext(tmp_path / "cache", tmp_path / "models"))
    s = result.summary
    assert s["training_set"]["size"] == 8 and s["training_set"]["source"].startswith("imagefolder:")
    assert [la["type"] for la in s["layers"]] == ["Linear", "BatchNorm2d"]
    assert [la["params"] for la in s["layers"]] == [1026, 128]
    data = load_training_set(model.manifest, d)
    dup = [i for i in range(8) if np.array_equal(data.display(i), pictures[3])]
    assert s["images"][0]["top_helpful"]["total"][0]["index"] == dup[0]
    assert json.dumps(s)  # the summary is JSON


# ------------------------------------------------------------------ uploaded training set zips


def _zip_of(root: Path, prefix: str = "", extra: dict[str, bytes] | None = None) -> bytes:
    """The files under ``root`` as a zip (names relative to it, under ``prefix``), written in
    reverse order: the loader's order must not depend on the zip's."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(root.rglob("*"), reverse=True):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(root).as_posix())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("labels", [["dog", "cat", "bird"], ["x", "y", "z"]])  # by name, by count
@pytest.mark.parametrize("prefix", ["", "train/"])
def test_zip_gives_the_image_folders_tensors_and_labels(tmp_path, labels, prefix):
    from workers.datasets import uploaded_training_set

    rng = np.random.default_rng(1)
    for name in ["cat/b.png", "cat/a.png", "cat/sub/c.png", "dog/z.png", "dog/Y.jpg", "bird/q.bmp", "bird/p.png"]:
        path = tmp_path / "train" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        size = (5, 7) if name.endswith("z.png") else (6, 6)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    manifest = _folder_manifest(labels)
    folder = load_training_set(manifest, tmp_path)
    archive = _zip_of(tmp_path / "train", prefix, extra={"__MACOSX/cat/._a.png": b"junk", ".DS_Store": b"junk"})
    uploaded = uploaded_training_set(archive, manifest)
    assert len(uploaded) == len(folder) == 7
    assert uploaded.labels.tolist() == folder.labels.tolist()
    assert uploaded.tensor is not None and folder.tensor is not None
    assert torch.equal(uploaded.tensor, folder.tensor)
    assert torch.equal(uploaded.images(np.array([5, 1])), folder.images(np.array([5, 1])))
    assert all(np.array_equal(uploaded.display(i), folder.display(i)) for i in range(7))
    assert uploaded.source.startswith("upload:training_set.zip")
    # the fingerprint follows the zip's bytes (and the preprocessing), so gradient caches are reused
    assert uploaded_training_set(archive, manifest).fingerprint == uploaded.fingerprint
    other = _zip_of(tmp_path / "train", prefix, extra={prefix + "README.txt": b"same images, other bytes"})
    assert uploaded_training_set(other, manifest).fingerprint != uploaded.fingerprint
    resized = manifest.model_copy(update={"preprocessing": Preprocessing(size=(3, 3))})
    assert uploaded_training_set(archive, resized).fingerprint != uploaded.fingerprint


def _zip(members: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


def test_training_zip_checks():
    """``schemas.training_zip.check_training_zip``: the API's check, run again by the worker."""
    import io
    import zipfile

    from schemas.errors import PayloadTooLarge
    from schemas.training_zip import check_training_zip

    labels = ["0", "1", "2"]
    png = b"\x89PNG"  # structure only: nothing is decoded

    def check(data: bytes, max_images: int = 100, max_bytes: int = 1 << 20):
        return check_training_zip(data, labels, max_images, max_bytes)

    ok = check(_zip({"1/a.png": png, "0/b.PNG": png, "0/sub/c.jpg": png, "2/readme.txt": b""}))
    assert ok.members == ["0/b.PNG", "0/sub/c.jpg", "1/a.png"] and ok.labels == [0, 0, 1]
    single = check(_zip({"2/a.png": png}))  # one class folder, not a wrapper
    assert single.labels == [2]
    wrapped = check(_zip({"data/": b"", "data/1/a.png": png}))
    assert wrapped.members == ["data/1/a.png"] and wrapped.labels == [1]
    cases = [
        (b"PK\x03\x04 not really", BadParams, "not a readable zip"),
        (b"", BadParams, "not a readable zip"),
        (_zip({"a.png": png}), BadParams, "no class folders"),
        (_zip({"0/a.txt": b"", "1/b.txt": b""}), BadParams, "no images"),
        (_zip({"cat/a.png": png, "dog/b.png": png}), BadParams, "neither by name nor by count"),
        (_zip({"../0/a.png": png}), BadParams, r"'\.\.'"),
        (_zip({"0/../../a.png": png}), BadParams, r"'\.\.'"),
        (_zip({"/0/a.png": png}), BadParams, "absolute path"),
        (_zip({"C:/0/a.png": png}), BadParams, "absolute path"),
        (_zip({"0\\a.png": png}), BadParams, "backslash"),
        (_zip({"0/a.png": png, "0/./a.png": png}), BadParams, "twice"),
        (_zip({f"0/{i}.png": png for i in range(101)}), PayloadTooLarge, "101 images"),
        (_zip({f"0/{i}.txt": b"" for i in range(1300)}), PayloadTooLarge, "members"),
    ]
    for data, error, message in cases:
        with pytest.raises(error, match=message):
            check(data)
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("0/a.png", b"\0" * (2 << 20))
    assert len(bomb.getvalue()) < 10_000
    with pytest.raises(PayloadTooLarge, match="uncompressed"):
        check(bomb.getvalue())


def test_a_zip_image_over_the_pixel_limit_is_refused_before_the_rest_is_read():
    """A 200 x 200 noise PNG (over 64 KiB) in a zip whose CRC for it is wrong: read whole it
    is a corrupt member; with a 100-pixel limit it is refused for its pixels, which only
    reading stopped at its header (the first 64 KiB) can tell."""
    import io
    import struct
    import zipfile

    from schemas.errors import PayloadTooLarge
    from workers.datasets import _member_bytes

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(buf, "PNG")
    assert len(buf.getvalue()) > 1 << 16
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("0/noise.png", buf.getvalue())
    data = bytearray(archive.getvalue())
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 16, 0)  # the central directory's CRC-32 of the member
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo("0/noise.png")
    with pytest.raises(BadParams, match="corrupt"):
        _member_bytes(bytes(data), info, max_pixels=10**6)
    with pytest.raises(PayloadTooLarge, match="40000 pixels; the limit is 100"):
        _member_bytes(bytes(data), info, max_pixels=100)
