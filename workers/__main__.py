"""``python -m workers``: run a worker, or prepare the built-in models.

    python -m workers worker [--queues high default low] [--burst] [--preload ID ...] [--no-predict]
    python -m workers prepare

A worker re-executes itself once with ``ALLOCATOR_ENV`` (``workers.allocator``) in its
environment: glibc's default allocator costs 25-30% on batched passes.

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
    args = parser.parse_args(argv)
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
    from workers.worker import InspectorWorker

    if settings.intra_op_threads:
        torch.set_num_threads(settings.intra_op_threads)
    for model_id in args.preload:
        model_cache().get(model_id)
    conn = Redis.from_url(settings.redis_url)
    batcher = None
    if "high" in args.queues and not args.no_predict and not args.burst:
        from workers.batching import PredictBatcher
        from workers.registry import ModelCache

        batcher = PredictBatcher(
            Redis.from_url(settings.redis_url, socket_timeout=30),
            ModelCache.from_settings(settings, spin_wait=settings.predict_spin_wait),
            max_batch=settings.predict_max_batch,
            max_delay_ms=settings.predict_max_delay_ms,
        )
        for model_id in args.preload:
            batcher.models.get(model_id)
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
    worker.work(burst=args.burst, with_scheduler=True, max_jobs=settings.worker_max_jobs or None)


if __name__ == "__main__":
    main()
