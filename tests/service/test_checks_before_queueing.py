"""Checks before queueing (issue 20): bad ``.npy`` uploads, deep or huge params, loopback
callbacks written as numbers are 422 before any job exists; a predict does not cut a queued
job's input TTL; decoding big uploads leaves the event loop free; ``inspector worker
--queues high`` parses."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest
from fastapi.testclient import TestClient
from redis import Redis

from tests.conftest import ROOT
from tests.helpers import digit_png, png, submit


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def declaring(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """A .npy header declaring ``shape`` followed by no data at all."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


GOOD = np.random.default_rng(0).random((8, 8)).astype(np.float32)
BAD_NPY = {
    "object dtype": (npy(np.array([[None] * 8] * 8, dtype=object)), "dtype '|O'"),
    "complex dtype": (npy(GOOD.astype(np.complex64)), "real numbers only"),
    "wrong shape": (npy(GOOD[:7]), "shape [7, 8] does not fit 1 image(s) of 1x8x8"),
    "two maps for one image": (npy(np.stack([GOOD, GOOD])[:, None]), "shape [2, 1, 8, 8]"),
    "NaN": (npy(np.where(GOOD > 0.5, np.nan, GOOD)), "NaN or infinite"),
    "infinity": (npy(np.where(GOOD > 0.5, np.inf, GOOD)), "NaN or infinite"),
    "truncated": (npy(GOOD)[:-16], "truncated"),
    "trailing bytes": (npy(GOOD) + b"\0" * 16, "extra bytes"),
    "not a .npy": (png(np.zeros((8, 8), np.uint8)), "not a .npy array"),
    "empty": (b"", "not a .npy array"),
    "10^12 floats declared": (declaring((1_000_000, 1_000_000)), "does not fit"),
    "right shape, no data": (declaring((8, 8)), "truncated"),
}


def job_keys(settings) -> int:
    conn = Redis.from_url(settings.redis_url)
    return sum(1 for _ in conn.scan_iter("rq:job:*")) + sum(1 for _ in conn.scan_iter("inspector:input:*"))


@pytest.mark.parametrize("case", list(BAD_NPY))
def test_bad_npy_upload_is_422_before_any_job_exists(api, settings, case):
    data, message = BAD_NPY[case]
    image, label = digit_png(6)
    files = [("image", ("d.png", image, "image/png")), ("attribution", ("a.npy", data, "application/x-npy"))]
    before = job_keys(settings)
    r = api.post("/v1/jobs/u_analysis", files=files, data={"model_id": "digits-cnn", "params": "{}"})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["type"] == "bad_params" and message in error["message"], error
    assert job_keys(settings) == before, "nothing is stored or queued"


def test_a_header_declaring_a_trillion_floats_allocates_nothing(api):
    """Refused from the header (shape and byte count), not by allocating 4 TB or reading it."""
    image, _ = digit_png(6)
    for data in (declaring((1, 1, 8, 8 * 10**12)), declaring((8, 8)), declaring((10**6, 10**6))):
        files = [("image", ("d.png", image, "image/png")), ("attribution", ("a.npy", data, "application/x-npy"))]
        tracemalloc.start()
        r = api.post("/v1/jobs/u_analysis", files=files, data={"model_id": "digits-cnn"})
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert r.status_code == 422 and r.json()["error"]["type"] == "bad_params", r.text
        assert peak < 32 * 2**20, f"peak {peak / 2**20:.0f} MiB"


DEEP = "[" * 500 + "]" * 500
BIG_INT = "9" * 5000
PARAMS = {
    "nested 500 deep": '{"target": ' + DEEP + "}",
    "nested 100000 deep": '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "5,000-digit integer": '{"target": ' + BIG_INT + "}",
    "5,000-digit negative integer in a list": '{"target": [1, -' + BIG_INT + "]}",
}


@pytest.mark.parametrize("case", list(PARAMS))
def test_deep_or_huge_params_are_422_for_saliency_and_predict(api, case):
    """Multipart and JSON: a 422 naming params, not a RecursionError or int()'s 4,300-digit
    ValueError answered 500."""
    image, _ = digit_png(0)
    text = PARAMS[case]
    encoded = base64.b64encode(image).decode()
    for url in ("/v1/jobs/saliency", "/v1/models/digits-cnn/predict"):
        files = {"image": ("d.png", image, "image/png")}
        r = api.post(url, files=files, data={"model_id": "digits-cnn", "params": text})
        assert r.status_code == 422 and r.json()["error"]["type"] == "bad_params", (url, r.text[:300])
        body = f'{{"model_id": "digits-cnn", "image_base64": "{encoded}", "params": {text}}}'
        r = api.post(url, content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["type"] == "bad_params", (url, "json", r.text[:300])


@pytest.fixture
def own_api(own_redis, settings):
    """An API on a Redis of the test's own, with no worker (submitted jobs stay queued)."""
    from service.main import create_app

    s = settings.model_copy(update={"redis_url": own_redis.url, "predict_timeout_s": 1.0, "webhook_secret": "s3cret"})
    with TestClient(create_app(s)) as api:
        yield api, Redis.from_url(own_redis.url)


@pytest.mark.parametrize("host", ["2130706433", "127.1", "0x7f000001", "0177.0.0.1", "10.1", "[::1]", "localhost"])
def test_loopback_and_private_callbacks_in_any_notation_are_422_at_submit(own_api, host):
    api, conn = own_api
    image, _ = digit_png(0)
    data = {"model_id": "digits-cnn", "callback_url": f"http://{host}:8080/hook"}
    r = api.post("/v1/jobs/saliency", files={"image": ("d.png", image, "image/png")}, data=data)
    assert r.status_code == 422 and "loopback or private" in r.json()["error"]["message"], r.text
    assert not list(conn.scan_iter("rq:job:*"))


def test_a_predict_does_not_cut_a_queued_jobs_input_ttl(own_api):
    """The job's input is stored for a day; a predict of the same bytes (90 s) keeps it."""
    api, conn = own_api
    image, _ = digit_png(3)
    r = submit(api, "saliency", [image], "digits-cnn")
    assert r.status_code == 202, r.text
    (key,) = conn.scan_iter("inspector:input:*")
    day = conn.ttl(key)
    assert day > 80_000
    r = api.post("/v1/models/digits-cnn/predict", files={"image": ("d.png", image, "image/png")})
    assert r.status_code == 503 and r.json()["error"]["type"] == "no_worker"  # nobody serves it: it waited
    assert conn.ttl(key) >= day - 5, "the queued job's input keeps its day"


def test_healthz_answers_while_big_uploads_are_decoded(own_api):
    """8 images of 6 MP each (a flat colour: a few KB of PNG each, within every limit; the
    issue's 40 MP ones take a minute on a busy 2-core machine): decoding and storing them
    takes seconds, in a thread; ``/healthz`` keeps answering meanwhile (before: not at all
    until the upload was done, 5.6 s for 8 x 40 MP)."""
    api, _ = own_api
    big = png(np.full((2000, 3000, 3), 200, np.uint8), compress_level=9)
    done = threading.Event()
    result = {}

    def upload() -> None:
        files = [("image", (f"{i}.png", big, "image/png")) for i in range(8)]
        result["r"] = api.post("/v1/jobs/saliency", files=files, data={"model_id": "digits-cnn"})
        done.set()

    worker = threading.Thread(target=upload)
    worker.start()
    times = []
    t0 = time.perf_counter()
    while not done.is_set():
        t = time.perf_counter()
        assert api.get("/healthz").status_code == 200
        times.append(time.perf_counter() - t)
        time.sleep(0.02)
    worker.join()
    upload_s = time.perf_counter() - t0
    assert result["r"].status_code == 202, result["r"].text
    ms = np.percentile(times, [50, 90, 100]) * 1000
    print(f"upload {upload_s:.1f} s, {len(times)} /healthz: median {ms[0]:.0f} ms, 90% {ms[1]:.0f}, max {ms[2]:.0f}")
    assert len(times) >= 10 and upload_s > 0.5
    # The target is 50 ms; a shared 2-core machine adds its own stalls to the tail.
    assert ms[0] < 50 and ms[1] < 150, ms


def test_inspector_worker_takes_the_workers_own_options():
    """``inspector worker --queues high`` hands its options to ``python -m workers worker`` (it
    was an argparse error of the ``inspector`` parser): that parser accepts ``high`` and names
    the choices for a queue that does not exist."""

    def inspector_worker(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "service.cli", "worker", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
        )

    ok = inspector_worker("--queues", "high", "default", "--no-predict", "--help")
    assert ok.returncode == 0 and "--queues" in ok.stdout, ok.stderr
    bad = inspector_worker("--queues", "highest", "--help")
    assert bad.returncode == 2 and "python -m workers worker: error: argument --queues: invalid choice" in bad.stderr
