"""Dynamic batching of predicts (what TorchServe calls ``batch_size`` / ``max_batch_delay``).

The API pushes each predict request onto its model's Redis list
(``schemas.keys.predict_queue_key``) and waits on the request's reply key. In every worker
that serves the ``high`` queue a ``PredictBatcher`` thread takes the first request waiting
for any model (BLPOP), then more requests for the same model: whatever is queued already,
then whatever arrives within ``max_delay_ms``, up to ``max_batch`` images. It runs them
as one batched forward through the model's forward engine (in the engine's chunk size),
and pushes each request's reply (``schemas.jobs.PredictResponse`` or an error) onto its
reply key. Under load, requests pile up while a batch runs, so the next batch fills at
once and the delay is not waited. The window is adaptive: it is waited only while
requests come concurrently (the previous batch had more than one), so a lone client's
request is served at once instead of paying ``max_delay_ms`` for company that never comes.

LPOP/BLPOP hand each request to exactly one worker, so workers share the load; a request
past its deadline (its client got 503) is dropped, not computed. ``threads`` serving
threads (setting ``predict_threads``, default 2) each take and run their own batch: while
one thread decodes its images or answers, the other's forward keeps the cores busy. On the
CPU the batches run through a session of their own with ``predict_intra_op_threads``
threads (default 1), each on its serving thread: two one-thread forwards side by side cost
less CPU per image than one forward spread over two cores (docs/performance.md).

The batcher shares the jobs' model cache (one copy of each model per worker): its predicts
run through an ONNX Runtime session (``LoadedModel.predict_forward``, else the jobs'
``forward``), never through the module that a job on the main thread may be hooking
(Captum's DeepLift and layer methods register forward hooks that change what the module
computes). A model whose engine is eager (no ONNX) gets a second copy of the batcher's own.
A request that had to wait for its model to load says how long in ``cold_start_s``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from PIL import Image
from redis import Redis

from schemas import keys
from schemas.errors import BadImage, InspectorError, JobFailure
from schemas.jobs import PredictResponse
from schemas.manifests import ModelRegistry
from workers.allocator import release_free_memory
from workers.explain.base import LoadedModel
from workers.pipeline import decode, forward_in_chunks
from workers.registry import ModelCache, preprocess
from workers.tasks import top_predictions

log = logging.getLogger(__name__)
REPLY_TTL_S = 60
POLL_S = 0.001  # while filling a batch, look for more requests this often


@dataclass(frozen=True)
class PredictRequest:
    id: str
    inputs: list[str]  # input ids (schemas.keys.input_key)
    top_k: int
    deadline: float  # unix time after which the API no longer waits

    @classmethod
    def parse(cls, raw: bytes | str) -> PredictRequest:
        d = json.loads(raw)
        return cls(d["id"], list(d["inputs"]), int(d["top_k"]), float(d["deadline"]))


def _error(e: InspectorError) -> dict[str, Any]:
    return {"error": {"type": e.type, "message": e.message, "details": e.details, "status": e.status}}


def answer(
    model: LoadedModel,
    images: list[Image.Image],
    requests: list[PredictRequest],
    spent_s: float = 0.0,
    cold_s: float = 0.0,
) -> dict[str, dict[str, Any]]:
    """One forward for ``images`` (the decoded inputs of ``requests``, in order): each
    request's reply by id. ``spent_s``: time the batch took before (reported in
    ``runtime_ms``); ``cold_s``: how long it waited for the model to load."""
    if not requests:
        return {}
    t0 = time.perf_counter() - spent_s
    # One array for the whole batch: no torch op (whose OpenMP threads would spin beside
    # another serving thread's forward) before the engine.
    x, _ = preprocess(images, model.manifest.preprocessing)
    probs = forward_in_chunks(model, x.to(model.device), predict=True).softmax(1)
    ms = (time.perf_counter() - t0) * 1000
    replies, at = {}, 0
    for r in requests:
        p, at = probs[at : at + len(r.inputs)], at + len(r.inputs)
        replies[r.id] = PredictResponse(
            model_id=model.id,
            model_version=model.version,
            predictions=top_predictions(p, model.manifest.labels, r.top_k),
            runtime_ms=ms,
            batch_size=len(x),
            cold_start_s=round(cold_s, 3) if cold_s > 0.05 else None,
        ).model_dump()
    return replies


def warm_up_photo(model: LoadedModel) -> bytes:
    """A stored upload as the API stores a camera's photo (``schemas.stored_images``): a
    JPEG, at least VGA-sized (Pillow keeps the memory blocks of the largest images it
    decoded), of noise."""
    h, w = model.manifest.preprocessing.size
    noise = np.random.default_rng(0).integers(0, 256, (max(2 * h, 480), max(2 * w, 640), 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def warm_predict_path(models: ModelCache, model_id: str) -> None:
    """Load and warm the model, then answer one predict of a photo-sized JPEG through the code
    a real one takes (decode, preprocess, the predict engine, softmax, top-k, the reply), so
    that nothing on that path is first used by a request. The worker's warm-up runs it
    (``workers.warmup``); each serving thread then serves one through Redis (``_warm``)."""
    model = models.get(model_id)
    request = PredictRequest("warm-up", ["warm-up"], 1, math.inf)
    json.dumps(answer(model, [decode(warm_up_photo(model))], [request]))


class PredictBatcher:
    def __init__(
        self,
        conn: Redis,
        models: ModelCache,
        max_batch: int = 32,
        max_delay_ms: float = 5.0,
        block_s: float = 1.0,
        threads: int = 1,
    ) -> None:
        self.conn, self.models = conn, models
        self.registry = ModelRegistry(models.models_dir)
        self.max_batch, self.max_delay_s, self.block_s = max_batch, max_delay_ms / 1000, block_s
        self.threads = threads
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._state = threading.local()  # per serving thread: whether its last batch was concurrent
        self._lock = threading.Lock()  # the counters and the eager copies
        self._eager: ModelCache | None = None  # own copies of models served eagerly (see _model)
        self._warm_threads = 0
        self.warmed = threading.Event()  # every serving thread has run its warm-up (see _warm)
        self.batches = 0  # counters, for logs and tests
        self.requests = 0

    # --- taking requests ---

    def next_batch(self) -> tuple[str, list[PredictRequest]] | None:
        """Block up to ``block_s`` for a request; then fill its model's batch (see module doc)."""
        ids = sorted(self.registry.entries())
        if not ids:
            time.sleep(self.block_s)
            return None
        popped = self.conn.blpop([keys.predict_queue_key(m) for m in ids], timeout=self.block_s)
        if popped is None:
            return None
        key = popped[0].decode() if isinstance(popped[0], bytes) else str(popped[0])
        batch = [PredictRequest.parse(popped[1])]
        n = len(batch[0].inputs)
        # The window is waited only while the last batch this thread served had company.
        concurrent = getattr(self._state, "concurrent", False)
        fill_until = time.monotonic() + (self.max_delay_s if concurrent else 0.0)
        while n < self.max_batch:
            raw = self.conn.lpop(key, self.max_batch - n) or []
            if not raw:
                # Poll, not BLPOP: Redis times blocked clients out on its cron tick (100 ms
                # at the default hz 10), far coarser than a few milliseconds.
                left = fill_until - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(POLL_S, left))
                continue
            for r in cast(list[bytes], raw):
                batch.append(PredictRequest.parse(r))
                n += len(batch[-1].inputs)
        self._state.concurrent = len(batch) > 1
        return key.removeprefix(keys.predict_queue_key("")), batch

    # --- serving them ---

    def serve(self, model_id: str, batch: list[PredictRequest]) -> dict[str, dict[str, Any]]:
        """Replies by request id (pushed onto each reply key); one forward for the batch."""
        t0 = time.perf_counter()
        now = time.time()
        live = [r for r in batch if r.deadline > now]
        replies: dict[str, dict[str, Any]] = {}
        try:
            model, cold_s = self._model(model_id)
            data = self.conn.mget([keys.input_key(i) for r in live for i in r.inputs]) if live else []
            images: list[Image.Image] = []
            ok: list[PredictRequest] = []
            at = 0
            for r in live:
                pngs, at = data[at : at + len(r.inputs)], at + len(r.inputs)
                if any(p is None for p in pngs):
                    replies[r.id] = _error(JobFailure("the input images expired", type="input_expired"))
                    continue
                try:
                    decoded = [decode(cast(bytes, p)) for p in pngs]
                except (OSError, ValueError, SyntaxError, EOFError) as e:  # one bad request must not sink the batch
                    # A corrupt upload: the API stores plain JPEGs for predicts without decoding them.
                    replies[r.id] = _error(BadImage(f"corrupt or truncated image: {e}"))
                    continue
                images.extend(decoded)
                ok.append(r)
            replies.update(answer(model, images, ok, time.perf_counter() - t0, cold_s))
        except InspectorError as e:
            replies = {r.id: _error(e) for r in live}
        except Exception as e:  # the waiting requests must get an answer, not a timeout
            log.exception("predict batch of %s failed", model_id)
            replies = {r.id: _error(JobFailure(f"{type(e).__name__}: {e}", type="internal")) for r in live}
        if replies:
            with self.conn.pipeline(transaction=False) as pipe:
                for request_id, reply in replies.items():
                    pipe.rpush(keys.reply_key(request_id), json.dumps(reply))
                    pipe.expire(keys.reply_key(request_id), REPLY_TTL_S)
                pipe.execute()
        return replies

    def _model(self, model_id: str) -> tuple[LoadedModel, float]:
        """The model and the seconds spent waiting for it to load (see the module doc): the
        jobs' copy when its forward engine is ONNX Runtime (a session Captum's hooks on the
        module cannot touch), a copy of the batcher's own when the engine is eager."""
        model, cold_s = self.models.get_timed(model_id)
        if model.engine_name == "eager":
            with self._lock:
                if self._eager is None:
                    self._eager = self.models.sibling()
            model, own_s = self._eager.get_timed(model_id)
            cold_s += own_s
        return model, cold_s

    def serve_once(self) -> int:
        """Take and serve one batch; returns how many requests it had (0 when none came)."""
        got = self.next_batch()
        if got is None:
            return 0
        self.serve(*got)
        with self._lock:
            self.batches += 1
            self.requests += len(got[1])
        return len(got[1])

    # --- the thread ---

    def _warm(self) -> None:
        """Serve one predict of each warm model in this thread, through Redis, before taking
        requests: a new thread's first batch pays for what the worker's warm-up on its main
        thread did not warm (this thread's allocator arena, decoder and engine run, and the
        Redis round trips of a batch). The request is the thread's own (never queued), and
        its input and reply are deleted after."""
        for model_id in self.models.loaded():
            request = PredictRequest(f"warm-up-{uuid.uuid4().hex}", [f"warm-up-{uuid.uuid4().hex}"], 1, math.inf)
            try:
                self.conn.set(keys.input_key(request.inputs[0]), warm_up_photo(self.models.get(model_id)), ex=60)
                reply = self.serve(model_id, [request])[request.id]
                self.conn.delete(keys.input_key(request.inputs[0]), keys.reply_key(request.id))
                if "error" in reply:
                    log.warning("predict batcher: cannot warm %s: %s", model_id, reply["error"]["message"])
            except Exception:  # e.g. Redis restarting: a request for it reports what is wrong
                log.warning("predict batcher: cannot warm %s", model_id, exc_info=True)
        with self._lock:
            self._warm_threads += 1
            if self._warm_threads == self.threads:
                self.warmed.set()

    def _run(self) -> None:
        self._warm()
        served = False  # since the last trim
        while not self._stop.is_set():
            try:
                if self.serve_once():
                    served = True
                elif served:  # a quiet second after a burst: its activations go back to the OS
                    release_free_memory()
                    served = False
            except Exception:  # e.g. Redis restarting: keep serving once it is back
                log.warning("predict batcher: retrying after an error", exc_info=True)
                self._stop.wait(1.0)

    def start(self) -> None:
        """Start ``threads`` serving threads (see the module doc)."""
        self._threads = [
            threading.Thread(target=self._run, name=f"predict-batcher-{i}", daemon=True) for i in range(self.threads)
        ]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batches in hand, then stop (graceful shutdown)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
