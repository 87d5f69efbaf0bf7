"""Influence with a training set uploaded as a zip (``training_set``): through the API, a real
worker and digits-cnn; bad zips are refused at submit, before anything is queued."""

from __future__ import annotations

import base64
import io
import json
import struct
import zipfile

import numpy as np
import pytest

from tests.helpers import digit_png, png, wait_for

PER_CLASS = 6


def _zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _post(client, kind: str, image: bytes, archive: bytes, params: dict | None = None):
    files = [("image", ("t.png", image, "image/png")), ("training_set", ("train.zip", archive, "application/zip"))]
    data = {"model_id": "digits-cnn", "params": json.dumps(params or {"layers": ["fc"], "solver": "exact"})}
    return client.post(f"/v1/jobs/{kind}", files=files, data=data)


def test_influence_on_an_uploaded_training_set(client):
    """60 digits training images (6 per class, folders named by the labels), one of them the
    test image itself: the job scores exactly those 60 points and the duplicate ranks first."""
    from workers.models.digits import load_split

    x, y, _, _ = load_split()
    # A test image the model is unsure of (p = 0.18 for its label): its own gradient is large,
    # so its duplicate dominates (score 248 vs 0.65 for the next; on a confidently classified
    # image all 60 gradients are ~0 and the order among them is noise).
    test_image, label = digit_png(15)
    members: dict[str, bytes] = {}
    for k in range(10):
        picks = np.flatnonzero(y == k)[: PER_CLASS - (k == label)]
        for j, i in enumerate(picks):
            members[f"digits/{k}/t{j:02d}.png"] = png((x[i] * 255).round().astype(np.uint8))
    members[f"digits/{label}/dup.png"] = test_image  # sorts first in its class folder
    archive = _zip(members)
    duplicate = PER_CLASS * label  # classes in name order, files sorted within each
    params = {"layers": ["fc"], "solver": "exact", "target": label, "top_k": 3}
    r = _post(client, "influence", test_image, archive, params)
    assert r.status_code in (200, 202), r.text
    view, _ = wait_for(client, r.json()["id"], timeout=300)
    assert view["status"] == "finished", view
    s = view["result"]
    assert s["training_set"]["size"] == 60 and s["training_set"]["source"].startswith("upload:training_set.zip")
    assert s["images"][0]["top_helpful"]["total"][0]["index"] == duplicate
    links = {a["name"]: a["url"] for a in view["artifacts"]}
    scores = np.load(io.BytesIO(client.get(links["scores.npy"]).content))
    assert scores.shape == (1, 2, 60) and np.isfinite(scores).all()  # fc, total
    assert int(np.argmax(scores[0, -1])) == duplicate
    # the same upload again (as JSON, base64): the same job, reused
    body = {
        "model_id": "digits-cnn", "image_base64": base64.b64encode(test_image).decode(), "params": params,
        "files_base64": {"training_set": base64.b64encode(archive).decode()},
    }
    again = client.post("/v1/jobs/influence", json=body)
    assert again.status_code == 200 and again.json()["id"] == view["id"]


def test_catalogue_lists_the_upload(api):
    kinds = {k["kind"]: k for k in api.get("/v1/methods").json()["kinds"]}
    for kind in ("influence", "influence_groups"):
        assert [f["name"] for f in kinds[kind]["files"]] == ["training_set"]
        assert "zip" in kinds[kind]["files"][0]["description"]
    assert [f["name"] for f in kinds["u_analysis"]["files"]] == ["attribution"]
    assert kinds["saliency"]["files"] == []


def _bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("0/a.png", "w") as f:
            block = b"\0" * (1 << 20)
            for _ in range(257):  # 257 MiB declared: over the 256 MiB default
                f.write(block)
    return buf.getvalue()


BAD = {
    "not a zip": (b"this is not a zip file", 422, "not a readable zip"),
    "no class folders": (_zip({"a.png": b"x", "b.png": b"y"}), 422, "no class folders"),
    "no images": (_zip({"0/a.txt": b"x", "1/b.txt": b"y"}), 422, "no images"),
    "labels": (_zip({"cat/a.png": b"x", "dog/b.png": b"y"}), 422, "neither by name nor by count"),
    "dot-dot": (_zip({"0/../../etc/a.png": b"x"}), 422, "'..'"),
    "absolute": (_zip({"/0/a.png": b"x"}), 422, "absolute path"),
    "too many images": (_zip({f"0/{i}.png": b"" for i in range(10_001)}, zipfile.ZIP_STORED), 413, "10001 images"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_zips_are_refused_at_submit(api, case):
    data, status, message = BAD[case]
    image, _ = digit_png(0)
    r = _post(api, "influence", image, data)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == ("bad_params" if status == 422 else "payload_too_large")


def test_zip_bomb_and_oversized_zip_are_413(api):
    image, _ = digit_png(0)
    bomb = _bomb()
    assert len(bomb) < 1 << 20
    r = _post(api, "influence_groups", image, bomb, {"layers": ["fc"]})
    assert r.status_code == 413 and "uncompressed" in r.json()["error"]["message"], r.text
    r = _post(api, "influence", image, b"\0" * (16 * 1024 * 1024 + 1))
    assert r.status_code == 413, r.text
    # a kind that takes no training set refuses the upload
    r = _post(api, "saliency", image, _zip({"0/a.png": image}), {})
    assert r.status_code == 422 and "unexpected upload" in r.json()["error"]["message"]


def _lying_bomb(inflated: int = 512 << 20, declared: int = 100) -> bytes:
    """A valid two-class zip whose ``0/a.png`` declares ``declared`` bytes and inflates to
    ``inflated`` (zeros, deflated: half a megabyte): its sizes in the local header and the
    central directory are rewritten after writing."""
    image, _ = digit_png(1)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("0/a.png", "w") as f:
            block = bytes(1 << 20)
            for _ in range(inflated >> 20):
                f.write(block)
        zf.writestr("1/b.png", image)
    data = bytearray(buf.getvalue())
    struct.pack_into("<I", data, 22, declared)  # local header of the first member: uncompressed size
    central = data.index(b"PK\x01\x02")  # its central directory entry
    struct.pack_into("<I", data, central + 24, declared)
    return bytes(data)


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def test_a_zip_member_inflating_past_its_declared_size_costs_the_worker_no_memory(client, worker):
    """The API sees 100 declared bytes (within every limit) and queues the job; the worker reads
    the member 64 KiB at a time, stops past 100 bytes and fails the job ``bad_params``. Its
    peak resident memory (reset before the job: /proc/PID/clear_refs) grows by far less than
    the 512 MiB the member inflates to (before: about 1 GB)."""
    bomb = _lying_bomb()
    assert len(bomb) < 1 << 20
    with open(f"/proc/{worker.pid}/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current resident size
    before = _peak_rss_mb(worker.pid)
    image, _ = digit_png(0)
    r = _post(client, "influence", image, bomb)
    assert r.status_code in (200, 202), r.text
    view, _ = wait_for(client, r.json()["id"], timeout=120)
    assert view["status"] == "failed" and view["error"]["type"] == "bad_params", view
    assert "inflates past its declared size of 100 bytes" in view["error"]["message"]
    grown = _peak_rss_mb(worker.pid) - before
    assert grown < 128, f"the worker's peak grew by {grown:.0f} MiB"


@pytest.mark.parametrize(
    "compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
)
def test_read_member_reads_each_compression_and_stops_at_the_declared_size(compression):
    """``schemas.training_zip.read_member``: the bytes written, for each compression the zip
    check accepts; a member of 16 MiB declaring 100 bytes is refused having allocated less
    than 10 MiB (zipfile's own read inflates all 16 MiB first)."""
    import tracemalloc

    from schemas.errors import BadParams
    from schemas.training_zip import read_member

    data = bytes(range(256)) * 1000
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        zf.writestr("0/a.png", data)
        zf.writestr("0/empty.png", b"")
        zf.writestr("1/big.png", bytes(16 << 20))
    archive = buf.getvalue()
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        assert read_member(archive, zf.getinfo("0/a.png")) == data
        assert read_member(archive, zf.getinfo("0/empty.png")) == b""
        big = zf.getinfo("1/big.png")
    big.file_size = 100
    tracemalloc.start()
    with pytest.raises(BadParams, match="1/big.png"):
        read_member(archive, big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 << 20, f"{peak / 2**20:.1f} MiB"
