"""The Python client (``model_inspector``) against the real stack: uvicorn serving the API, a
real redis-server and the session's real worker. Tenants with API keys come from a keys file,
one of them rate limited (1 request/s, burst 1) for the 429 retries."""

from __future__ import annotations

import asyncio
import io
import logging
import subprocess
import sys
import threading
import time
import zipfile

import httpx
import numpy as np
import pytest
from PIL import Image

import schemas.errors as api_errors
from model_inspector import AsyncClient, Client, errors
from tests.client.support import digits_folder, keys_file, running_api
from tests.conftest import ROOT
from tests.helpers import digit_png

TENANTS = {"alice": {}, "slow": {"rate_limit_per_s": 1, "rate_limit_burst": 1}}
SALIENCY = {"method": "saliency"}
SMALL_SWEEP = {
    "limit": 12,
    "images_per_chunk": 4,
    "methods": [{"method": "saliency"}],
    "orders": ["decreasing"],
    "noises": ["zeros"],
    "window_px": [2],
}


class Recorder(httpx.HTTPTransport):
    """The real HTTP transport, recording each request; ``refuse_events`` answers the SSE
    route as a proxy that cannot stream would (502), so the client has to poll."""

    def __init__(self, refuse_events: bool = False) -> None:
        super().__init__()
        self.refuse_events = refuse_events
        self.requests: list[tuple[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path))
        if self.refuse_events and request.url.path.endswith("/events"):
            return httpx.Response(502, text="<html>502 Bad Gateway</html>", headers={"content-type": "text/html"})
        return super().handle_request(request)


class AsyncRefusingEvents(httpx.AsyncHTTPTransport):
    """The async side of ``Recorder(refuse_events=True)``."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path))
        if request.url.path.endswith("/events"):
            return httpx.Response(502, text="<html>502 Bad Gateway</html>", headers={"content-type": "text/html"})
        return await super().handle_async_request(request)


@pytest.fixture(scope="module")
def api(settings, worker, tmp_path_factory):
    path = keys_file(tmp_path_factory.mktemp("keys") / "keys.json", TENANTS)
    with running_api(settings, INSPECTOR_API_KEYS_FILE=str(path)) as url:
        yield url


@pytest.fixture
def ic(api):
    with Client(api, api_key="alice-key") as c:
        yield c


def test_predict_takes_paths_bytes_pil_images_and_arrays(ic, tmp_path):
    data, label = digit_png(11)
    path = tmp_path / "digit.png"
    path.write_bytes(data)
    pil = Image.open(io.BytesIO(data))
    grey = np.asarray(pil)  # (8, 8) uint8
    inputs = [
        str(path),
        path,
        data,
        pil,
        grey,
        grey.astype(np.float32) / 255,  # floats in [0, 1]
        grey[None],  # (C, H, W)
        grey[..., None],  # (H, W, 1)
        np.stack([grey] * 3, axis=-1),  # RGB with R = G = B: the same grey for the model
    ]
    response = ic.predict(inputs, model="digits-cnn", top_k=3)
    tops = [[(c.index, round(c.probability, 6)) for c in p.top] for p in response.predictions]
    assert len(tops) == len(inputs) and all(t == tops[0] for t in tops), tops
    assert tops[0][0][0] == label
    batch = np.stack([grey, grey])[..., None]  # (N, H, W, C): two images
    assert len(ic.predict(batch, model="digits-cnn").predictions) == 2
    with pytest.raises(ValueError, match="image array"):
        ic.predict(np.zeros((2, 8, 8)), model="digits-cnn")
    assert "digits-cnn" in {m.id for m in ic.models()}


def test_submit_wait_over_sse_reports_progress_and_fetches_results(api, tmp_path):
    recorder = Recorder()
    updates = []
    with Client(api, api_key="alice-key", transport=recorder) as c:
        job = c.submit("u_sweep", model="digits-cnn", dataset="model:test", params=SMALL_SWEEP)
        assert job.view.params["dataset"] == "model:test"
        assert job.wait(timeout=180, progress=updates.append) is job
        saved = job.download(tmp_path / "out")
        csv_name = next(n for n in job.artifacts if n.endswith(".csv"))
        png_name = next(n for n in job.artifacts if n.endswith(".png"))
        assert (saved / csv_name).read_bytes() == job.artifact(csv_name)
        assert job.image(png_name).size[0] > 0
    assert job.status == "finished" and job.result is not None
    assert {p.name for p in saved.iterdir()} == {"result.json", *job.artifacts}
    # progress: the callback saw the job move and end, each update a change
    assert len(updates) >= 2 and updates[-1].status == "finished"
    assert updates[-1].done == updates[-1].total >= 1
    assert all(a != b for a, b in zip(updates, updates[1:], strict=False))
    # followed over SSE, not by polling
    assert ("GET", f"/v1/jobs/{job.id}/events") in recorder.requests
    assert ("GET", f"/v1/jobs/{job.id}") not in recorder.requests


def test_wait_falls_back_to_polling_when_the_stream_is_refused(api):
    recorder = Recorder(refuse_events=True)
    image, _ = digit_png(5)
    updates = []
    with Client(api, api_key="alice-key", transport=recorder) as c:
        job = c.submit("attribution", image, model="digits-cnn", params={"method": "saliency"})
        job.wait(timeout=120, progress=updates.append)
        attribution = job.array("0-attribution.npy")
    assert ("GET", f"/v1/jobs/{job.id}/events") in recorder.requests
    assert ("GET", f"/v1/jobs/{job.id}") in recorder.requests  # polled
    assert updates[-1].status == "finished"
    assert attribution.shape[-2:] == (8, 8) and np.isfinite(attribution).all() and np.abs(attribution).sum() > 0


def test_api_errors_map_onto_the_exception_tree(api, ic):
    image, _ = digit_png(3)
    with pytest.raises(errors.UnknownModel) as e:
        ic.predict(image, model="nope")
    assert e.value.status == 404 and isinstance(e.value, errors.NotFound)
    with pytest.raises(errors.BadParams) as e:
        ic.submit("attribution", image, model="digits-cnn", params={"method": "no-such-method"})
    assert e.value.status == 422 and "method" in str(e.value.details)
    with pytest.raises(errors.BadImage):
        ic.predict(image[: len(image) // 2], model="digits-cnn")  # a truncated PNG
    with pytest.raises(errors.UnsupportedMedia):
        ic.predict(b"plain text, not an image", model="digits-cnn")
    with pytest.raises(errors.UnknownJob):
        ic.job("0" * 32)
    job = ic.submit("attribution", image, model="digits-cnn", params={"method": "saliency"}).wait(timeout=120)
    with pytest.raises(errors.UnknownArtifact):
        job.artifact("nothing.npy")
    with pytest.raises(errors.IdempotencyKeyReused):
        for method in ("saliency", "input_x_gradient"):
            ic.submit("attribution", image, model="digits-cnn", params={"method": method}, idempotency_key="k-1")
    with Client(api, api_key="wrong-key") as bad, pytest.raises(errors.Unauthorized):
        bad.models()
    with pytest.raises(errors.TransportError):
        with Client("http://127.0.0.1:9", retries=1, backoff=0.01) as nowhere:
            nowhere.models()


def test_every_api_error_type_has_its_client_class():
    def tree(cls):
        return [cls, *(c for sub in cls.__subclasses__() for c in tree(sub))]

    for cls in tree(api_errors.InspectorError):
        if issubclass(cls, api_errors.JobFailure) or cls is api_errors.InspectorError:
            continue
        mirror = errors.BY_TYPE[cls.type]
        assert mirror.__name__ == cls.__name__ and mirror.status == cls.status, cls


def test_idempotency_key_gives_the_same_job_back(ic):
    image, _ = digit_png(7)
    params = {"method": "saliency", "abs": False}
    first = ic.submit("attribution", image, model="digits-cnn", params=params, idempotency_key="nightly-7")
    first.wait(timeout=120)
    again = ic.submit("attribution", image, model="digits-cnn", params=params, idempotency_key="nightly-7")
    assert again.id == first.id and again.view.deduplicated


def test_rate_limited_answers_are_retried_after_retry_after(api, caplog):
    image, _ = digit_png(2)
    with Client(api, api_key="slow-key", retries=0) as c:
        with pytest.raises(errors.RateLimited) as e:
            for _ in range(3):
                c.predict(image, model="digits-cnn")
    assert e.value.status == 429 and e.value.retry_after is not None and e.value.retry_after >= 1
    caplog.set_level(logging.WARNING, logger="model_inspector")
    with Client(api, api_key="slow-key") as c:
        t0 = time.monotonic()
        results = [c.predict(image, model="digits-cnn") for _ in range(3)]
        elapsed = time.monotonic() - t0
    assert len(results) == 3
    retries = [r for r in caplog.records if "429" in r.getMessage()]
    assert retries, "no request was retried"
    assert elapsed >= 0.9 * len(retries)  # each retry waited its Retry-After (1 s)


def test_unavailable_queue_is_retried_until_redis_is_back(settings, own_redis, caplog, tmp_path):
    """A real 503: the API's Redis stops; the submit is retried (Retry-After) and lands, once.
    On the same API (no worker, a quota of one data set): 409 for a data set a queued job
    uses, and the storage quota's 429 answered at once (its Retry-After: 60 is not waited)."""
    s = settings.model_copy(update={"redis_url": own_redis.url, "max_datasets": 1})
    image, _ = digit_png(1)
    caplog.set_level(logging.WARNING, logger="model_inspector")
    with running_api(s) as url, Client(url, max_wait=10) as c:
        own_redis.stop()
        restart = threading.Timer(1.0, own_redis.start)
        restart.start()
        try:
            job = c.submit("attribution", image, model="digits-cnn", params=SALIENCY, idempotency_key="after-outage")
        finally:
            restart.join()
        assert job.status == "queued"  # no worker on this Redis: it stays queued
        assert any("503" in r.getMessage() for r in caplog.records)
        again = c.submit("attribution", image, model="digits-cnn", params=SALIENCY, idempotency_key="after-outage")
        assert again.id == job.id
        assert c.job(job.id).cancel().status == "canceled"
        with pytest.raises(errors.JobCanceled):
            c.job(job.id).wait(timeout=5)
        # a data set a queued job reads cannot be deleted (409) until the job is gone
        ds = c.datasets.upload(digits_folder(tmp_path / "digits", 4))
        job = c.submit("attribution_batch", model="digits-cnn", dataset=ds.id)
        with pytest.raises(errors.DatasetInUse) as e:
            c.datasets.delete(ds.id)
        assert e.value.status == 409 and isinstance(e.value, errors.Conflict)
        with Client(url) as patient, pytest.raises(errors.QuotaExceeded) as quota:
            t0 = time.monotonic()
            patient.datasets.upload(digits_folder(tmp_path / "more", 5))
        assert time.monotonic() - t0 < 10 and quota.value.retry_after == 60
        job.cancel()
        c.datasets.delete(ds.id)


def test_datasets_upload_a_folder_list_get_run_a_job_and_delete(api, ic, tmp_path):
    folder = digits_folder(tmp_path / "digits", 20)
    info = ic.datasets.upload(folder)
    assert info.id.startswith("ds_") and info.images == 20 and info.name == "digits"
    assert info.classes == sorted({p.name for p in folder.iterdir()})
    assert ic.datasets.upload(folder).id == info.id  # the same bytes: the same data set
    listed = {d.id: d for d in ic.datasets.list()}
    assert info.id in listed and "model:digits-cnn/test" in listed and listed["model:digits-cnn/test"].read_only
    detail = ic.datasets.get(info.id)
    assert sum(detail.class_counts.values()) == 20
    with Client(api, api_key="slow-key") as other, pytest.raises(errors.UnknownDataset):
        other.datasets.get(info.id)  # another tenant's data set is not there

    updates = []
    job = ic.submit(
        "attribution_batch", model="digits-cnn", dataset=info.id, params={"images_per_chunk": 8, "dtype": "float32"}
    )
    job.wait(timeout=180, progress=updates.append)
    maps = job.array("maps.npy")
    assert maps.shape == (20, 8, 8) and maps.dtype == np.float32 and np.isfinite(maps).all()
    counted = [u.done for u in updates if u.total == 20]  # progress counts images
    assert counted == sorted(counted) and updates[-1].status == "finished" and updates[-1].done == 20
    archive = job.download_zip(tmp_path / "result.zip")
    with zipfile.ZipFile(archive) as zf:
        assert {"result.json", "maps.npy"} <= set(zf.namelist())
        assert np.array_equal(np.load(io.BytesIO(zf.read("maps.npy"))), maps)

    ic.datasets.delete(info.id)
    with pytest.raises(errors.UnknownDataset):
        ic.datasets.get(info.id)


def test_wait_times_out_and_cancel_ends_the_job(ic):
    job = ic.submit("u_sweep", model="digits-cnn", dataset="model:test", params={**SMALL_SWEEP, "limit": 400})
    with pytest.raises(errors.WaitTimeout):
        job.wait(timeout=0.3)
    job.cancel()
    with pytest.raises(errors.JobCanceled) as e:
        job.wait(timeout=60)
    assert e.value.job.status == "canceled"


def test_async_client(api, tmp_path):
    image, label = digit_png(11)
    folder = digits_folder(tmp_path / "few", 3)

    async def main():
        async with AsyncClient(api, api_key="alice-key") as c:
            models = await c.models()
            prediction, job = await asyncio.gather(
                c.predict(np.asarray(Image.open(io.BytesIO(image))), model="digits-cnn"),
                c.submit("attribution", image, model="digits-cnn", params={"method": "input_x_gradient"}),
            )
            updates = []
            await job.wait(timeout=120, progress=updates.append)
            array = await job.array("0-attribution.npy")
            with pytest.raises(errors.UnknownModel):
                await c.predict(image, model="nope")
            ds = await c.datasets.upload(folder)
            assert (await c.datasets.get(ds.id)).images == 3 and ds.id in {d.id for d in await c.datasets.list()}
            await c.datasets.delete(ds.id)
        refusing = AsyncRefusingEvents()
        async with AsyncClient(api, api_key="alice-key", transport=refusing) as c:
            polled = await c.submit("attribution", image, model="digits-cnn", params={"method": "saliency"})
            await polled.wait(timeout=120)
        assert ("GET", f"/v1/jobs/{polled.id}") in refusing.requests and polled.status == "finished"
        return models, prediction, job, updates, array

    models, prediction, job, updates, array = asyncio.run(main())
    assert "digits-cnn" in {m.id for m in models}
    assert prediction.predictions[0].top[0].index == label
    assert job.status == "finished" and updates[-1].status == "finished"
    assert array.shape[-2:] == (8, 8)


def test_the_client_needs_no_service_or_worker_extras():
    """``pip install model-inspector`` without extras: the client and the CLI's client commands
    import with FastAPI, uvicorn, Redis, RQ and torch all unavailable."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED: raise ImportError(f'blocked {name}')\n"
        "BLOCKED = {'fastapi', 'starlette', 'uvicorn', 'sse_starlette', 'redis', 'rq', 'torch', 'torchvision',"
        " 'captum', 'onnxruntime', 'workers', 'multipart', 'prometheus_client'}\n"
        "sys.meta_path.insert(0, Block())\n"
        "import model_inspector, service.cli\n"
        "service.cli.main(['predict', '--help'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--model" in out.stdout, out.stderr
