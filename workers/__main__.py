"""``python -m workers``: run a worker, or prepare the built-in models.

    python -m workers worker [--queues high default low] [--burst] [--preload ID ...]
    python -m workers prepare

Start workers with ``ALLOCATOR_ENV`` (``workers.engine``) in the environment: glibc's
default allocator costs 25-30% on batched passes; ``inspector worker`` sets it.
"""

from __future__ import annotations

import argparse
import logging

from redis import Redis

from schemas import keys
from schemas.settings import get_settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run an RQ worker")
    w.add_argument("--queues", nargs="+", default=list(keys.QUEUES), choices=keys.QUEUES)
    w.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    w.add_argument("--preload", nargs="*", default=[], help="model ids to load before taking jobs")
    w.add_argument("--name", default=None)
    sub.add_parser("prepare", help="write the built-in models into the models directory")
    args = parser.parse_args(argv)

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
    worker = InspectorWorker(
        args.queues,
        connection=conn,
        name=args.name,
        heartbeat_s=settings.worker_heartbeat_s,
        lost_after_s=settings.worker_lost_after_s,
    )
    worker.work(burst=args.burst, with_scheduler=False)


if __name__ == "__main__":
    main()
