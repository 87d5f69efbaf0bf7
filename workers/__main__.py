"""``python -m workers``: run a worker, or prepare the built-in models.

    python -m workers worker [--queues high default low] [--burst] [--preload ID ...] [--no-predict]
    python -m workers prepare
    python -m workers ready     # exit 0 when a worker of this host is registered and warm (healthchecks)

A worker re-executes itself once with ``ALLOCATOR_ENV`` (``workers.allocator``) in its
environment: glibc's default allocator costs 25-30% on batched passes.

Before it registers for its queues a worker warms its models (``workers.warmup``: the
``warm_models`` setting, ``all`` by default, plus ``--preload``), and publishes what it has
warm for ``/readyz``.

A worker on the ``high`` queue also serves predicts (batched: ``workers.batching``) unless
``--no-predict``. It runs RQ's scheduler (one per Redis, by lock), which moves retries
and webhook redeliveries out of their backoff. It exits after ``worker_max_jobs`` jobs or
when a job leaves it above ``worker_max_rss_mb``: run it under a supervisor that restarts
it (compose ``restart: unless-stopped``, a Kubernetes Deployment). SIGTERM lets the running
job finish first (give it a grace period as long as the longest job you want kept).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from redis import Redis

from schemas import keys
from schemas.settings import get_settings
from workers.allocator import exec_with_allocator_env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run an RQ worker")
    w.add_argument("--queues", nargs="+", default=list(keys.QUEUES), choices=keys.QUEUES)
    w.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    w.add_argument("--preload", nargs="*", default=[], help="model ids to load before taking jobs")
    w.add_argument("--name", default=None)
    w.add_argument("--no-predict", action="store_true", help="do not serve predicts (high queue workers do)")
    sub.add_parser("prepare", help="write the built-in models into the models directory")
    sub.add_parser("ready", help="exit 0 when a worker on this host is registered and warm, else 1")
    args = parser.parse_args(argv)
    if args.command == "ready":
        raise SystemExit(0 if _host_worker_ready() else 1)
    if args.command == "worker":
        exec_with_allocator_env(sys.argv[1:] if argv is None else argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    from workers.registry import prepare_builtin_models

    written = prepare_builtin_models(settings.models_dir)
    if args.command == "prepare":
        print(f"models ready in {settings.models_dir} (new: {', '.join(written) or 'none'})")
        return

    import torch

    from workers.tasks import model_cache
    from workers.warmup import Warmer
    from workers.worker import InspectorWorker

    if settings.intra_op_threads:
        torch.set_num_threads(settings.intra_op_threads)
    conn = Redis.from_url(settings.redis_url)
    batcher = None
    if "high" in args.queues and not args.no_predict and not args.burst:
        from workers.batching import PredictBatcher

        # One copy of each model: the batcher shares the jobs' cache (with a session of its
        # own where its threads or spin mode differ: LoadedModel.predict_forward).
        batcher = PredictBatcher(
            Redis.from_url(settings.redis_url, socket_timeout=30),
            model_cache(),
            max_batch=settings.predict_max_batch,
            max_delay_ms=settings.predict_max_delay_ms,
            threads=settings.predict_threads,
        )
    worker = InspectorWorker(
        args.queues,
        connection=conn,
        name=args.name,
        heartbeat_s=settings.worker_heartbeat_s,
        lost_after_s=settings.worker_lost_after_s,
        batcher=batcher,
        max_rss_mb=settings.worker_max_rss_mb,
        redis_outage_s=settings.redis_outage_s,
    )
    warmer = Warmer(
        conn,
        model_cache(),
        worker.name,
        list(args.queues),
        settings.warm_models,
        args.preload,
        publish_s=settings.worker_heartbeat_s,
        rescan_s=settings.worker_heartbeat_s,
        ttl_s=int(settings.worker_lost_after_s) + 60,
    )
    worker.warmer = warmer
    # A stop asked for during the warm-up (Ctrl-C, SIGTERM) ends the worker quietly; RQ
    # installs its own handlers (warm shutdown) once it works.
    previous = {sig: signal.signal(sig, _exit_quietly) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        warmer.warm_up()
    except SystemExit:
        warmer.stop()
        raise
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    worker.work(burst=args.burst, with_scheduler=True, max_jobs=settings.worker_max_jobs or None)


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _host_worker_ready() -> bool:
    """A worker on this host (RQ records each worker's hostname) is registered and warm."""
    import socket

    from rq import Worker

    from schemas.jobs import WarmState

    settings = get_settings()
    conn = Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout_s)
    host = socket.gethostname()
    for w in Worker.all(connection=conn):
        raw = conn.get(keys.warm_key(w.name)) if w.hostname == host else None
        if raw is not None and WarmState.model_validate_json(raw).ready:
            return True
    return False


if __name__ == "__main__":
    main()
