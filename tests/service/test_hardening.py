"""Durability, webhooks, retries, time budgets, graceful shutdown, recycling and batched
predicts, with real redis-servers (one with AOF on disk), real workers and real models.

The first tests share one environment (``env``): a Redis with ``--appendonly yes`` in a
temporary directory, job retries on (``job_retries=1``), webhooks signed and allowed to
loopback, and workers started and stopped by the tests in file order. A "slow job" is a
saliency job on efficientnet-lite0, one image per pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import ROOT, RedisServer, _spawn_redis, free_port, settings_env, start_worker
from tests.helpers import digit_png, png, submit, wait_for

SECRET = "webhook-secret-for-tests"


# --- a webhook receiver on 127.0.0.1 --------------------------------------------------------


@dataclasses.dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    status: int


class Hooks:
    """Records every POST; answers 500 to the first call on a path listed in ``flaky``."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.flaky: set[str] = set()
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                failed_before = any(c.path == self.path for c in hooks.calls)
                status = 500 if self.path in hooks.flaky and not failed_before else 200
                hooks.calls.append(Call(self.path, dict(self.headers), body, time.time(), status))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def wait(self, path: str, n: int, timeout: float = 60) -> list[Call]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [c for c in self.calls if c.path == path]
            if len(got) >= n:
                return got
            time.sleep(0.05)
        raise AssertionError(f"{path}: {len([c for c in self.calls if c.path == path])} calls, expected {n}")


# --- the shared environment ------------------------------------------------------------------


class Env:
    def __init__(self, settings, tmp: Path) -> None:
        self.port, self.dir = free_port(), tmp
        self.redis = self._spawn()
        self.settings = settings.model_copy(
            update={
                "redis_url": f"redis://127.0.0.1:{self.port}/0",
                "onnx_engine": False,  # gradient jobs only: no export at load
                "job_retries": 1,
                "job_retry_backoff_s": [0],  # a killed worker's scheduler lock lasts 61 s; see test
                "worker_heartbeat_s": 1,
                "worker_lost_after_s": 5,
                "webhook_secret": SECRET,
                "webhook_allow_private": True,
                "webhook_retries": 3,
                "webhook_backoff_s": [2],  # RQ schedules to the whole second: 1-3 s
            }
        )
        self.workers: list[subprocess.Popen] = []

    def _spawn(self) -> subprocess.Popen:
        # appendfsync always: nothing acknowledged is lost (compose uses everysec: at most 1 s).
        proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return proc
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def restart_redis(self, down_s: float = 0.0) -> None:
        self.redis.terminate()
        self.redis.wait(10)
        time.sleep(down_s)
        self.redis = self._spawn()

    def worker(self) -> subprocess.Popen:
        proc = start_worker(self.settings, "--no-predict", "--preload", "efficientnet-lite0")
        self.workers.append(proc)
        return proc

    def alive(self) -> subprocess.Popen:
        for w in self.workers:
            if w.poll() is None:
                return w
        return self.worker()

    def conn(self):
        from redis import Redis

        return Redis.from_url(self.settings.redis_url)

    def job(self, job_id: str):
        from rq.job import Job
        from rq.serializers import JSONSerializer

        return Job.fetch(job_id, connection=self.conn(), serializer=JSONSerializer)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a worker and its children (RQ's scheduler), as when its container dies."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    for pid in [proc.pid, *map(int, children)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10)


@pytest.fixture(scope="module")
def env(settings, tmp_path_factory) -> Iterator[Env]:
    e = Env(settings, tmp_path_factory.mktemp("aof"))
    yield e
    for w in e.workers:
        if w.poll() is None:
            w.terminate()
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                kill_tree(w)
    e.redis.kill()
    e.redis.wait(10)


@pytest.fixture(scope="module")
def hooks() -> Iterator[Hooks]:
    h = Hooks()
    yield h
    h.server.shutdown()


@pytest.fixture
def api(env) -> Iterator[TestClient]:
    from service.main import create_app

    with TestClient(create_app(env.settings)) as c:
        yield c


def slow_job(api, seed: int, n: int, **data):
    """Seconds of work reporting progress after every image."""
    from skimage import data as skdata

    img = png(np.roll(skdata.chelsea(), seed, axis=1))
    files = [("image", (f"{i}.png", img, "image/png")) for i in range(n)]
    form = {"model_id": "efficientnet-lite0", "params": json.dumps({"batch_size": 1}), **data}
    r = api.post("/v1/jobs/saliency", files=files, data=form)
    assert r.status_code == 202, r.text
    return r.json()


def verify(call: Call) -> dict:
    from workers.webhooks import verify_signature

    h = {k.lower(): v for k, v in call.headers.items()}
    assert verify_signature(SECRET, h["x-inspector-timestamp"], call.body, h["x-inspector-signature"])
    assert not verify_signature("wrong", h["x-inspector-timestamp"], call.body, h["x-inspector-signature"])
    assert h["x-inspector-event"] == "job.ended" and h["content-type"] == "application/json"
    return json.loads(call.body)


# --- durability ------------------------------------------------------------------------------


def test_queued_job_survives_a_redis_restart(env, api, hooks):
    """No worker yet: a queued job (and a canceled one's pending notification) are on disk
    (AOF); after a Redis restart a worker that starts then runs the job."""
    image, label = digit_png(20)
    job = submit(api, "saliency", [image], "digits-cnn", {"target": label}).json()
    other, _ = digit_png(21)
    canceled = api.post("/v1/jobs/saliency", files={"image": ("x.png", other, "image/png")},
                        data={"model_id": "digits-cnn", "callback_url": hooks.url("/canceled")}).json()  # fmt: skip
    assert api.delete(f"/v1/jobs/{canceled['id']}").json()["status"] == "canceled"
    env.restart_redis()
    assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
    env.worker()
    view, _ = wait_for(api, job["id"], timeout=120)
    assert view["status"] == "finished" and view["result"]["images"][0]["target"] == label
    event = verify(hooks.wait("/canceled", 1)[0])
    assert event["job"]["id"] == canceled["id"] and event["job"]["status"] == "canceled"


def test_redis_restarted_mid_job(env, api):
    """Redis is away for 1.5 s from the job's start: its progress reports in that time are
    skipped, its worker holds the outcome until Redis is back (``workers.outage``) and
    renews the job's heartbeat at once; the job finishes (its state was on disk), once."""
    worker = env.alive()
    job = slow_job(api, 1, 4)
    wait_for(api, job["id"], until=("started",), timeout=120)
    env.restart_redis(down_s=1.5)
    view, seen = wait_for(api, job["id"], timeout=120)
    assert view["status"] == "finished", view
    assert worker.poll() is None, "the worker survives a Redis restart"
    assert "queued" not in seen and env.job(job["id"]).meta["attempt"] == 1, f"not rerun: {seen}"
    print(f"job through a Redis restart: {' -> '.join(seen)}")


# --- webhooks --------------------------------------------------------------------------------


def test_completion_webhook_is_signed_and_retried_with_backoff(env, api, hooks):
    env.alive()
    hooks.flaky.add("/flaky")
    image, label = digit_png(22)
    r = api.post("/v1/jobs/saliency?wait=60", files={"image": ("x.png", image, "image/png")},
                 data={"model_id": "digits-cnn", "callback_url": hooks.url("/flaky")})  # fmt: skip
    assert r.status_code == 200, r.text
    first, second = hooks.wait("/flaky", 2)
    assert (first.status, second.status) == (500, 200)
    assert second.at - first.at >= 1.0, "redelivered after the backoff"
    h1, h2 = ({k.lower(): v for k, v in c.headers.items()} for c in (first, second))
    assert h1["x-inspector-delivery"] == h2["x-inspector-delivery"]
    event = verify(second)
    assert event["job"]["id"] == r.json()["id"] and event["job"]["status"] == "finished"
    assert event["job"]["url"].endswith(f"/v1/jobs/{r.json()['id']}") and event["job"]["error"] is None
    # The same job again, already finished, with another URL: that URL is notified at once,
    # and the first one is not notified twice.
    again = api.post("/v1/jobs/saliency", files={"image": ("x.png", image, "image/png")},
                     data={"model_id": "digits-cnn", "callback_url": hooks.url("/late")})  # fmt: skip
    assert again.json()["id"] == r.json()["id"] and again.json()["deduplicated"]
    assert verify(hooks.wait("/late", 1)[0])["job"]["status"] == "finished"
    time.sleep(1.5)
    assert len([c for c in hooks.calls if c.path == "/flaky"]) == 2


def test_canceling_a_running_job_notifies_canceled(env, api, hooks):
    env.alive()
    job = slow_job(api, 2, 8, callback_url=hooks.url("/stop"))
    wait_for(api, job["id"], until=("started",), timeout=120)
    api.delete(f"/v1/jobs/{job['id']}")
    view, _ = wait_for(api, job["id"], timeout=120)
    assert view["status"] == "canceled"
    event = verify(hooks.wait("/stop", 1)[0])
    assert event["job"]["status"] == "canceled" and event["job"]["error"]["type"] == "canceled"


# --- retries and time budgets ----------------------------------------------------------------


def test_job_of_a_killed_worker_is_retried_on_another(env, api, hooks):
    """job_retries=1: the job of a SIGKILLed worker (and its scheduler) reruns elsewhere.
    Backoff 0 here: a killed scheduler's lock outlives it by 61 s (RQ), which would hold up
    a delayed retry that long; the webhook test covers delayed (scheduled) retries."""
    worker = env.alive()
    job = slow_job(api, 3, 3, callback_url=hooks.url("/retried"))
    wait_for(api, job["id"], until=("started",), timeout=120)
    kill_tree(worker)
    env.worker()
    view, seen = wait_for(api, job["id"], timeout=300)
    assert view["status"] == "finished", view
    rq_job = env.job(job["id"])
    assert rq_job.meta["attempt"] == 2 and rq_job.meta["last_error"]["type"] == "worker_lost"
    calls = hooks.wait("/retried", 1)
    assert len(calls) == 1 and verify(calls[0])["job"]["status"] == "finished"  # not notified of the loss
    print(f"killed worker's job: {' -> '.join(seen)}, attempt {rq_job.meta['attempt']}")


def test_client_errors_in_the_worker_are_not_retried(env, api):
    """A BadParams raised by the worker (the model changed since submit) ends the job."""
    from schemas.params import SaliencyParams
    from service import jobs
    from service.images import decode_image

    env.alive()
    entry = api.app.state.registry.get("digits-cnn")
    stale = dataclasses.replace(entry, version="0" * 64)
    image, _ = digit_png(23)
    decoded = decode_image(image, 10**6, 10**6)
    job, _ = jobs.submit(env.conn(), env.settings, "saliency", stale, [decoded], SaliencyParams())
    view, seen = wait_for(api, job.id, timeout=120)
    assert view["status"] == "failed" and view["error"]["type"] == "bad_params", view
    assert env.job(job.id).meta["attempt"] == 1, "ran once"
    assert "queued" not in seen[1:]


def test_job_over_its_kinds_time_budget_fails_with_timeout(env, api, monkeypatch):
    from schemas.kinds import KINDS

    env.alive()
    monkeypatch.setitem(KINDS, "saliency", dataclasses.replace(KINDS["saliency"], timeout_s=1))
    job = slow_job(api, 4, 16)
    view, _ = wait_for(api, job["id"], timeout=120)
    assert view["status"] == "failed" and view["error"]["type"] == "timeout", view
    assert view["progress"]["done"] < 16
    assert env.job(job["id"]).meta["attempt"] == 1, "a timeout is not retried"
    monkeypatch.undo()
    image, _ = digit_png(24)
    assert submit(api, "saliency", [image], "digits-cnn", wait=60).status_code == 200  # worker still serving


def test_job_over_its_kinds_memory_budget_fails_and_the_worker_serves_on(env):
    """A job that loads a model no worker holds yet and runs it on 8 images grows its
    worker by far more than 5 MiB: stopped at the next beat (1 s), failed, not retried."""
    from service.main import create_app

    env.worker()  # a fresh worker, whatever the earlier tests left running
    budgeted = env.settings.model_copy(update={"kind_memory_mb": {"saliency": 5}})
    with TestClient(create_app(budgeted)) as api:
        from skimage import data as skdata

        files = [("image", (f"{i}.png", png(np.roll(skdata.chelsea(), i, axis=0)), "image/png")) for i in range(8)]
        form = {"model_id": "efficientnet-lite1", "params": json.dumps({"batch_size": 1})}
        r = api.post("/v1/jobs/saliency", files=files, data=form)
        assert r.status_code == 202, r.text
        view, _ = wait_for(api, r.json()["id"], timeout=180)
        assert view["status"] == "failed" and view["error"]["type"] == "memory_budget", view
        assert "budget is 5 MiB" in view["error"]["message"]
        assert env.job(r.json()["id"]).meta["attempt"] == 1, "a job over its memory budget is not retried"
    with TestClient(create_app(env.settings)) as api:  # no budget: the same workers still serve
        assert submit(api, "saliency", [digit_png(25)[0]], "digits-cnn", wait=60).status_code == 200


# --- graceful shutdown -----------------------------------------------------------------------


def test_sigterm_lets_the_running_job_finish_then_the_worker_exits(env, api):
    worker = env.alive()
    job = slow_job(api, 5, 4)
    wait_for(api, job["id"], until=("started",), timeout=120)
    worker.send_signal(signal.SIGTERM)
    running = api.get(f"/v1/jobs/{job['id']}").json()
    assert running["status"] == "started" and running["progress"]["done"] < 4
    view, _ = wait_for(api, job["id"], timeout=300)
    assert view["status"] == "finished", view
    assert worker.wait(60) == 0


# --- recycling -------------------------------------------------------------------------------


def test_worker_recycles_after_max_jobs_and_over_its_memory_budget(settings):
    from service.main import create_app

    port = free_port()
    server = RedisServer(port, _spawn_redis(port))
    s = settings.model_copy(update={"redis_url": server.url, "onnx_engine": False})
    try:
        with TestClient(create_app(s)) as api:
            ids = [submit(api, "saliency", [digit_png(30 + i)[0]], "digits-cnn").json()["id"] for i in range(3)]

            def run(**limits) -> list[str]:
                env = settings_env(s.model_copy(update=limits))
                done = subprocess.run([sys.executable, "-m", "workers", "worker", "--burst"], cwd=ROOT, env=env,
                                      timeout=300, capture_output=True)  # fmt: skip
                assert done.returncode == 0, done.stderr[-2000:]
                return [api.get(f"/v1/jobs/{i}").json()["status"] for i in ids]

            assert run(worker_max_rss_mb=1) == ["finished", "queued", "queued"]  # over budget after one job
            assert run(worker_max_jobs=1) == ["finished", "finished", "queued"]
    finally:
        server.process.kill()
        server.process.wait(10)


# --- batched predicts ------------------------------------------------------------------------


def test_concurrent_predicts_are_batched_and_each_gets_its_own_answer(app, worker, model_cache):
    import httpx
    import torch
    from PIL import Image

    from workers.registry import preprocess

    images = [digit_png(i)[0] for i in range(24)]

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            return await asyncio.gather(*[
                c.post("/v1/models/digits-cnn/predict", files={"image": ("x.png", b, "image/png")}) for b in images
            ])  # fmt: skip

    replies = asyncio.run(go())
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    model = model_cache.get("digits-cnn")
    x, _ = preprocess([Image.open(io.BytesIO(b)).convert("RGB") for b in images], model.manifest.preprocessing)
    with torch.no_grad():
        probs = model.forward(x).softmax(1)
    for r, p in zip(replies, probs, strict=True):
        top = r.json()["predictions"][0]["top"][0]
        assert top["index"] == int(p.argmax()) and abs(top["probability"] - float(p.max())) < 1e-4
    sizes = [r.json()["batch_size"] for r in replies]
    assert max(sizes) > 1, f"no two concurrent predicts shared a forward: {sizes}"


def test_batcher_fills_batches_drops_expired_requests_and_reports_bad_ones(model_cache, own_redis):
    from PIL import Image
    from redis import Redis

    from schemas import keys
    from workers.batching import PredictBatcher
    from workers.registry import preprocess

    conn = Redis.from_url(own_redis.url)
    batcher = PredictBatcher(conn, model_cache, max_batch=4, max_delay_ms=50, block_s=0.2)
    queue = keys.predict_queue_key("digits-cnn")
    for i in range(6):
        image, _ = digit_png(40 + i)
        if i != 2:  # request 2's input is missing (expired)
            conn.set(keys.input_key(f"in{i}"), image)
        deadline = time.time() - 1 if i == 1 else time.time() + 30  # request 1's client gave up
        conn.rpush(queue, json.dumps({"id": f"r{i}", "inputs": [f"in{i}"], "top_k": 3, "deadline": deadline}))
    first = batcher.serve(*batcher.next_batch())
    assert set(first) == {"r0", "r2", "r3"} and "r1" not in first  # 4 taken, the expired one dropped
    assert first["r2"]["error"]["type"] == "input_expired"
    assert first["r0"]["batch_size"] == first["r3"]["batch_size"] == 2
    t0 = time.monotonic()
    second = batcher.serve(*batcher.next_batch())
    assert set(second) == {"r4", "r5"} and second["r4"]["batch_size"] == 2
    assert time.monotonic() - t0 < 5
    assert batcher.next_batch() is None  # nothing queued: returns after block_s
    model = model_cache.get("digits-cnn")
    for rid in ("r0", "r3", "r4", "r5"):
        reply = json.loads(conn.lpop(keys.reply_key(rid)))
        x, _ = preprocess([Image.open(io.BytesIO(digit_png(40 + int(rid[1]))[0]))], model.manifest.preprocessing)
        probs = model.forward(x).softmax(1)[0]
        top = reply["predictions"][0]["top"]
        assert [t["index"] for t in top] == probs.topk(3).indices.tolist()
        assert abs(top[0]["probability"] - float(probs.max())) < 1e-5
    assert conn.lpop(keys.reply_key("r1")) is None


def test_batcher_waits_for_company_only_when_requests_come_concurrently(model_cache, own_redis):
    """A lone request is served at once; after a batch of several, the next batch waits up to
    ``max_delay_ms`` for more (the adaptive window of ``workers.batching``)."""
    from redis import Redis

    from schemas import keys
    from workers.batching import PredictBatcher

    conn = Redis.from_url(own_redis.url)
    batcher = PredictBatcher(conn, model_cache, max_batch=8, max_delay_ms=800, block_s=0.2)
    queue = keys.predict_queue_key("digits-cnn")

    def push(i: int) -> None:
        request = {"id": f"r{i}", "inputs": ["in"], "top_k": 1, "deadline": time.time() + 30}
        conn.rpush(queue, json.dumps(request))

    push(0)
    t0 = time.monotonic()
    _, batch = batcher.next_batch()
    assert [r.id for r in batch] == ["r0"] and time.monotonic() - t0 < 0.6  # no 800 ms wait
    push(1), push(2)
    _, batch = batcher.next_batch()
    assert [r.id for r in batch] == ["r1", "r2"]  # queued together: taken together
    push(3)
    t0 = time.monotonic()
    _, batch = batcher.next_batch()
    assert [r.id for r in batch] == ["r3"] and time.monotonic() - t0 >= 0.8  # waited the window


def test_batcher_threads_serve_side_by_side_on_a_predict_session_of_their_own(models_dir, own_redis):
    """``predict_threads`` serving threads each take their own batch (every request answered
    once, right); on the CPU they run a one-thread ONNX Runtime session of the model's own
    (``LoadedModel.predict_forward``) that computes what the jobs' session does."""
    from PIL import Image
    from redis import Redis

    from schemas import keys
    from tests.conftest import TEST_CACHE_DIR
    from workers.batching import PredictBatcher
    from workers.pipeline import forward_in_chunks
    from workers.registry import ModelCache, preprocess

    cache = ModelCache(models_dir, TEST_CACHE_DIR, device="cpu", intra_op_threads=2, predict_threads=1)
    model = cache.get("digits-cnn")
    assert model.engine_name == "onnxruntime" and model.predict_forward is not None
    images = [digit_png(i)[0] for i in range(24)]
    x, _ = preprocess([Image.open(io.BytesIO(b)) for b in images], model.manifest.preprocessing)
    jobs_probs = forward_in_chunks(model, x).softmax(1)
    assert (forward_in_chunks(model, x, predict=True).softmax(1) - jobs_probs).abs().max() < 1e-5

    conn = Redis.from_url(own_redis.url)
    batcher = PredictBatcher(conn, cache, max_batch=3, max_delay_ms=1, block_s=0.2, threads=2)
    for i, image in enumerate(images):
        conn.set(keys.input_key(f"in{i}"), image)
        request = {"id": f"r{i}", "inputs": [f"in{i}"], "top_k": 1, "deadline": time.time() + 30}
        conn.rpush(keys.predict_queue_key("digits-cnn"), json.dumps(request))
    batcher.start()
    try:
        replies = {i: conn.blpop([keys.reply_key(f"r{i}")], timeout=30) for i in range(len(images))}
    finally:
        batcher.stop()
    assert len(batcher._threads) == 2 and batcher.requests == len(images) and batcher.batches >= 8
    for i, reply in replies.items():
        assert reply is not None, f"r{i} got no answer"
        top = json.loads(reply[1])["predictions"][0]["top"][0]
        assert top["index"] == int(jobs_probs[i].argmax())
        assert abs(top["probability"] - float(jobs_probs[i].max())) < 1e-5
        assert conn.lpop(keys.reply_key(f"r{i}")) is None  # answered once


def test_the_api_reaps_a_dead_workers_job_without_worker_code(settings):
    """The API image has no worker code: reaping (RQ runs failure callbacks) must not need it.
    Its own Redis with no worker: the job is made to look started by a worker that died."""
    port = free_port()
    server = RedisServer(port, _spawn_redis(port))
    code = f"""
import sys, numpy as np
from fastapi.testclient import TestClient
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer
from schemas.settings import Settings
from service.main import create_app
from tests.helpers import png
s = Settings(redis_url={server.url!r}, models_dir={str(settings.models_dir)!r}, webhook_secret="x",
             webhook_allow_private=True)
with TestClient(create_app(s)) as api:
    files = {{"image": ("x.png", png(np.full((8, 8), 7, np.uint8)), "image/png")}}
    job_id = api.post("/v1/jobs/saliency", files=files, data={{"model_id": "digits-cnn", "params": '{{"abs": false}}',
                      "callback_url": "http://127.0.0.1:9/x"}}).json()["id"]
    conn = Redis.from_url(s.redis_url)
    Job.fetch(job_id, connection=conn, serializer=JSONSerializer).set_status("started")
    conn.zadd("rq:wip:high", {{job_id + ":gone": 1}})  # an execution whose heartbeat stopped long ago
    print(api.get("/v1/jobs/" + job_id).json()["error"]["type"])
print([m for m in ("torch", "workers") if m in sys.modules])
"""
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        server.process.kill()
        server.process.wait(10)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-3:-1] == ["worker_lost", "[]"], out.stdout
