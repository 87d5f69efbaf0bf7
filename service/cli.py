"""``inspector``: run the service and talk to it.

    inspector run                         Redis + a worker + the API, for local use (make run)
    inspector serve [--host H --port P]   the API only
    inspector worker [--queues ...]       a worker (python -m workers worker)
    inspector prepare                     write the built-in models
    inspector predict IMAGE... --model M [--top-k K]
    inspector explain KIND [IMAGE...] --model M [--params JSON] [--dataset ID] [--out DIR]
    inspector datasets upload PATH [--name NAME]    a zip, or a folder (zipped on the way)
    inspector datasets list | show ID | delete ID

The client commands talk HTTP to ``--url`` (default: the configured API address) through the
Python client (``model_inspector``), with ``--api-key`` (default: ``$INSPECTOR_API_KEY``);
``explain`` shows a progress bar while the job runs and saves its artifacts to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from model_inspector import Client, errors
from schemas.settings import get_settings


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, api_key=args.api_key or None)


def cmd_predict(args: argparse.Namespace) -> None:
    with _client(args) as client:
        result = client.predict(args.images, model=args.model, top_k=args.top_k)
    for path, pred in zip(args.images, result.predictions, strict=True):
        print(path)
        for c in pred.top:
            print(f"  {c.probability:7.2%}  {c.index:>4}  {c.label}")


def cmd_explain(args: argparse.Namespace) -> None:
    params = json.loads(args.params) if args.params else {}
    out = Path(args.out)
    with _client(args) as client:
        job = client.submit(args.kind, args.images, model=args.model, params=params, dataset=args.dataset)
        print(f"job {job.id} ({'reused' if job.view.deduplicated else 'submitted'})", file=sys.stderr)
        with tqdm(total=1, desc=job.status, unit="step", file=sys.stderr) as bar:
            job.wait(progress=bar)
        job.download(out)
    print(json.dumps(job.result, indent=2)[:4000])
    print(f"saved result.json and {len(job.artifacts)} artifacts to {out}/", file=sys.stderr)


def cmd_datasets(args: argparse.Namespace) -> None:
    with _client(args) as client:
        if args.action == "upload":
            info = client.datasets.upload(args.path, name=args.name)
            print(info.model_dump_json(indent=2))
        elif args.action == "list":
            for d in client.datasets.list():
                print(f"{d.id:<40} {d.images:>7} images {len(d.classes):>5} classes {d.bytes:>12} B  {d.name}")
        elif args.action == "show":
            print(client.datasets.get(args.id).model_dump_json(indent=2))
        else:
            client.datasets.delete(args.id)
            print(f"deleted {args.id}", file=sys.stderr)


def _reporting_errors(command: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> None:
    """A client command; the client's errors become one line on stderr and exit status 1."""
    try:
        command(args)
    except errors.APIError as e:
        sys.exit(f"error {e.status} {e.type}: {e.message}")
    except errors.JobError as e:
        sys.exit(f"job {e.job.status}: {e.type}: {e.message}")
    except errors.InspectorError as e:
        sys.exit(f"error: {e}")


CLIENT_COMMANDS = {"predict": cmd_predict, "explain": cmd_explain, "datasets": cmd_datasets}


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    uvicorn.run("service.main:app", host=args.host, port=args.port, log_level="info")


def _workers(argv: list[str]) -> None:
    os.execv(sys.executable, [sys.executable, "-m", "workers", *argv])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:  # the rest is the worker's own command line (python -m workers worker)
        _workers(argv)
    settings = get_settings()
    default_url = f"http://{settings.api_host}:{settings.api_port}"
    parser = argparse.ArgumentParser(
        prog="inspector", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("run", help="start Redis, a worker and the API (Ctrl-C stops all)")
    s = sub.add_parser("serve", help="run the API")
    s.add_argument("--host", default=settings.api_host)
    s.add_argument("--port", type=int, default=settings.api_port)
    w = sub.add_parser("worker", help="run a worker", add_help=False)
    w.add_argument("rest", nargs=argparse.REMAINDER)
    sub.add_parser("prepare", help="write the built-in models into the models directory")
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--url", default=default_url)
    conn.add_argument("--api-key", default=os.environ.get("INSPECTOR_API_KEY", ""), help="default: $INSPECTOR_API_KEY")
    p = sub.add_parser("predict", help="top-k classes of images", parents=[conn])
    p.add_argument("images", nargs="+")
    p.add_argument("--model", required=True)
    p.add_argument("--top-k", type=int, default=5)
    e = sub.add_parser("explain", help="run an explanation job and save its artifacts", parents=[conn])
    e.add_argument("kind")
    e.add_argument("images", nargs="*")
    e.add_argument("--model", required=True)
    e.add_argument("--params", default="", help="JSON object, see GET /v1/methods")
    e.add_argument("--dataset", default=None, help="a data set id (inspector datasets list) or model:<split>")
    e.add_argument("--out", default="inspector-out")
    d = sub.add_parser("datasets", help="upload, list, show and delete data sets")
    dsub = d.add_subparsers(dest="action", required=True)
    up = dsub.add_parser("upload", help="upload a zip or a folder (ImageFolder, or flat + labels.csv)", parents=[conn])
    up.add_argument("path")
    up.add_argument("--name", default=None)
    dsub.add_parser("list", help="data sets of the tenant and the models' registered ones", parents=[conn])
    for action in ("show", "delete"):
        a = dsub.add_parser(action, help=f"{action} a data set", parents=[conn])
        a.add_argument("id")
    args = parser.parse_args(argv)

    if args.command == "run":
        from service.devserver import run

        run(settings)
    elif args.command == "serve":
        cmd_serve(args)
    elif args.command == "worker":
        _workers(["worker", *args.rest])
    elif args.command == "prepare":
        _workers(["prepare"])
    else:
        _reporting_errors(CLIENT_COMMANDS[args.command], args)


if __name__ == "__main__":
    main()
