"""Warm-up: a worker loads and warms its models before it takes work, and says so.

What "warm" means (``workers.registry.ModelCache._load``): weights loaded, the forward
engine exported and checked (or loaded from the disk cache), batch sizes measured (or read
from the cache), one forward and one forward+backward run at those sizes, then one predict
answered through the predict path (``workers.batching.warm_predict_path``; each serving
thread of the predict batcher answers one more in its own thread before the worker says
ready). The engine cache (``<cache_dir>/onnx``, ``workers.engine``) is keyed by model
version, device and library versions, so a restarted worker loads instead of re-exporting
and re-measuring.

:class:`Warmer` warms the models the ``warm_models`` setting names (``all`` registered
ones, ``none``, or ids separated by commas; ``--preload`` adds to them) before the worker
registers for its queues, then publishes what it has warm to Redis
(``schemas.keys.warm_key``, a :class:`schemas.jobs.WarmState`) every heartbeat, with a TTL,
so a dead worker's entry expires. The API's ``/readyz`` and ``GET /v1/models/{id}`` read it.
Models added to the models directory later (any, with ``all``; those listed, otherwise)
are warmed in the background (rescanned every ``rescan_s``) and flip to warm when done. A
model that fails to warm (a broken user model) is reported in ``failed`` and does not hold
back readiness: its jobs fail with the load error as before.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Sequence

from redis import Redis
from redis.exceptions import RedisError

from schemas import keys
from schemas.errors import InspectorError
from schemas.jobs import WarmState
from workers.allocator import release_free_memory
from workers.batching import warm_predict_path
from workers.registry import ModelCache

log = logging.getLogger(__name__)


def warm_targets(spec: str, available: Sequence[str], preload: Sequence[str] = ()) -> list[str]:
    """Model ids to warm: ``spec`` is ``all``, ``none`` or ids separated by commas (an id
    not in ``available`` is kept: its warm-up fails and says why); ``preload`` adds to it."""
    spec = spec.strip()
    if spec == "all":
        chosen = sorted(available)
    elif spec in ("none", ""):
        chosen = []
    else:
        chosen = [m.strip() for m in spec.split(",") if m.strip()]
    return list(dict.fromkeys([*chosen, *preload]))


class Warmer:
    """Warms a worker's models and publishes its :class:`WarmState` (see the module doc)."""

    def __init__(
        self,
        conn: Redis,
        cache: ModelCache,
        worker_name: str,
        queues: list[str],
        spec: str = "all",
        preload: Sequence[str] = (),
        publish_s: float = 3.0,
        ttl_s: int = 75,
        rescan_s: float = 5.0,
    ) -> None:
        self.conn, self.cache, self.worker_name, self.queues = conn, cache, worker_name, queues
        self.spec, self.preload = spec, list(preload)
        self.publish_s, self.ttl_s, self.rescan_s = publish_s, ttl_s, rescan_s
        self.ready = False
        self.failed: dict[str, str] = {}
        self.warming: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._background: threading.Thread | None = None
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()

    # --- state ---

    def state(self) -> WarmState:
        with self._lock:
            warming, failed = list(self.warming), dict(self.failed)
        return WarmState(
            worker=self.worker_name,
            queues=self.queues,
            ready=self.ready,
            models=self.cache.loaded(),
            warming=warming,
            failed=failed,
        )

    def publish(self) -> None:
        try:
            self.conn.set(keys.warm_key(self.worker_name), self.state().model_dump_json(), ex=self.ttl_s)
        except RedisError as e:  # the next beat retries
            log.warning("cannot publish the warm state: %s", e)

    # --- warming ---

    def targets(self) -> list[str]:
        """The models to warm that the models directory holds now (a listed id that is not
        there yet is warmed when it appears)."""
        available = list(self.cache.registry.entries())
        return [m for m in warm_targets(self.spec, available, self.preload) if m in available]

    def warm(self, model_ids: list[str]) -> None:
        """Load and warm each model in turn (blocking); failures are logged and kept."""
        for model_id in model_ids:
            with self._lock:
                self.warming.append(model_id)
            self.publish()
            t0 = time.perf_counter()
            try:
                warm_predict_path(self.cache, model_id)
                log.info("warm: %s in %.1f s", model_id, time.perf_counter() - t0)
                with self._lock:
                    self.failed.pop(model_id, None)
            except InspectorError as e:
                log.error("cannot warm %s: %s", model_id, e.message)
                with self._lock:
                    self.failed[model_id] = f"{e.type}: {e.message}"
            except Exception as e:  # a broken user model must not stop the worker: its jobs report it
                log.exception("cannot warm %s", model_id)
                with self._lock:
                    self.failed[model_id] = f"{type(e).__name__}: {e}"
            finally:
                with self._lock:
                    self.warming.remove(model_id)
        release_free_memory()  # the measurements' activations: back to the OS before idling
        self.publish()

    def warm_up(self) -> None:
        """Warm the targets (blocking). The worker calls :meth:`mark_ready` once it takes work."""
        self._t0 = time.perf_counter()
        self.start()
        targets = self.targets()
        log.info("warming %d model(s) before taking work: %s", len(targets), ", ".join(targets) or "none")
        missing = [m for m in warm_targets(self.spec, [], self.preload) if m not in targets]
        if missing:
            log.warning("not in the models directory (warmed when they appear): %s", ", ".join(missing))
        self.warm(targets)
        # Collect once now and move what start-up made (torch's modules, the models) out of
        # the collector's sight: a full collection over them (tens of ms) would otherwise
        # land on an early request, and the RQ scheduler forked next shares their pages.
        gc.collect()
        gc.freeze()

    def mark_ready(self) -> None:
        """Say so: the worker is registered, its scheduler forked and its first maintenance
        done (``workers.worker.InspectorWorker``), so the first request meets a worker that
        does nothing else."""
        self.ready = True
        self.publish()
        log.info("ready in %.1f s (%d warm)", time.perf_counter() - self._t0, len(self.cache.loaded()))

    def _new_models(self) -> list[str]:
        """Targets neither warm nor failed nor being warmed (models added while running)."""
        loaded = self.cache.loaded()
        with self._lock:
            busy = set(self.failed) | set(self.warming)
        return [m for m in self.targets() if m not in loaded and m not in busy]

    # --- the thread ---

    def _run(self) -> None:
        next_scan = time.monotonic() + self.rescan_s
        while not self._stop.wait(self.publish_s):
            self.publish()
            if self.ready and time.monotonic() >= next_scan:
                next_scan = time.monotonic() + self.rescan_s
                background = self._background
                if (background is None or not background.is_alive()) and (new := self._new_models()):
                    log.info("new model(s) in the models directory: warming %s in the background", ", ".join(new))
                    self._background = threading.Thread(
                        target=self.warm, args=(new,), name="inspector-warm", daemon=True
                    )
                    self._background.start()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="inspector-warm-state", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop publishing and withdraw the state (a stopping worker is no longer warm)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.publish_s + 1)
        try:
            self.conn.delete(keys.warm_key(self.worker_name))
        except RedisError:
            pass  # it expires on its own
