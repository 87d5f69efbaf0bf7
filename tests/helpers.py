"""Small helpers shared by tests: encoding images, polling jobs."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
from PIL import Image


def png(arr: np.ndarray | Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def digit_png(index: int = 0, split: str = "test") -> tuple[bytes, int]:
    """A digits image as an 8x8 grey PNG (ink bright) and its label."""
    from workers.models.digits import load_split

    x_tr, y_tr, x_te, y_te = load_split()
    x, y = (x_te, y_te) if split == "test" else (x_tr, y_tr)
    return png((x[index] * 255).round().astype(np.uint8)), int(y[index])


def wait_for(client, job_id: str, timeout: float = 120, until: tuple[str, ...] = ("finished", "failed", "canceled")):
    """Poll ``GET /v1/jobs/{id}`` until its status is in ``until``; returns (view, statuses seen)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = client.get(f"/v1/jobs/{job_id}").json()
        if not seen or seen[-1] != view["status"]:
            seen.append(view["status"])
        if view["status"] in until:
            return view, seen
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {seen[-1]} after {timeout} s")


def submit(client, kind: str, images: list[bytes], model_id: str, params: dict | None = None, wait: float = 0):
    import json

    files = [("image", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)]
    data = {"model_id": model_id, "params": json.dumps(params or {})}
    return client.post(f"/v1/jobs/{kind}?wait={wait}", files=files, data=data)


def zip_of(members: dict[str, bytes], compression: int | None = None) -> bytes:
    """A zip holding ``members`` (name -> bytes), deflated unless ``compression`` says."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if compression is None else compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def noise_images(n: int, size: int = 16, seed: int = 0) -> list[bytes]:
    """``n`` different random RGB PNGs of ``size`` x ``size`` pixels."""
    rng = np.random.default_rng(seed)
    return [png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def upload_dataset(client, archive: bytes, name: str = "test-set", headers: dict[str, str] | None = None):
    """``POST /v1/datasets`` of a zip as a raw body; returns the response."""
    headers = {"Content-Type": "application/zip", **(headers or {})}
    return client.post(f"/v1/datasets?name={name}", content=archive, headers=headers)
