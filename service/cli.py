"""``inspector``: run the service and talk to it.

    inspector run                         Redis + a worker + the API, for local use (make run)
    inspector serve [--host H --port P]   the API only
    inspector worker [--queues ...]       a worker (python -m workers worker)
    inspector prepare                     write the built-in models
    inspector predict IMAGE... --model M [--top-k K]
    inspector explain KIND IMAGE... --model M [--params JSON] [--out DIR]

The client commands talk HTTP to ``--url`` (default: the configured API address); ``explain``
shows a progress bar while the job runs and saves its artifacts to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from schemas.settings import get_settings


def _files(paths: list[str]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [
        ("image", (Path(p).name, Path(p).read_bytes(), mimetypes.guess_type(p)[0] or "application/octet-stream"))
        for p in paths
    ]


def _check(r: httpx.Response) -> dict[str, Any]:
    if r.status_code >= 400:
        try:
            err = r.json()["error"]
            sys.exit(f"error {r.status_code} {err['type']}: {err['message']}")
        except (ValueError, KeyError):
            sys.exit(f"error {r.status_code}: {r.text[:500]}")
    return r.json()


def cmd_predict(args: argparse.Namespace) -> None:
    with httpx.Client(base_url=args.url, timeout=120) as http:
        r = http.post(f"/v1/models/{args.model}/predict", files=_files(args.images), data={"top_k": str(args.top_k)})
        result = _check(r)
    for path, pred in zip(args.images, result["predictions"], strict=True):
        print(path)
        for c in pred["top"]:
            print(f"  {c['probability']:7.2%}  {c['index']:>4}  {c['label']}")


def cmd_explain(args: argparse.Namespace) -> None:
    params = json.loads(args.params) if args.params else {}
    out = Path(args.out)
    with httpx.Client(base_url=args.url, timeout=60) as http:
        job = _check(
            http.post(
                f"/v1/jobs/{args.kind}",
                files=_files(args.images),
                data={"model_id": args.model, "params": json.dumps(params)},
            )
        )
        print(f"job {job['id']} ({'reused' if job['deduplicated'] else 'submitted'})", file=sys.stderr)
        with tqdm(total=1, desc=job["status"], unit="step", file=sys.stderr) as bar:
            while job["status"] not in ("finished", "failed", "canceled"):
                time.sleep(0.3)
                job = _check(http.get(f"/v1/jobs/{job['id']}"))
                p = job["progress"]
                bar.total = max(p["total"], 1)
                bar.n = p["done"]
                bar.set_description(f"{job['status']}: {p['stage']}")
                bar.refresh()
        if job["status"] != "finished":
            err = job.get("error") or {}
            sys.exit(f"job {job['status']}: {err.get('type')}: {err.get('message')}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(job, indent=2))
        for a in job["artifacts"]:
            r = http.get(a["url"])
            r.raise_for_status()
            (out / a["name"]).write_bytes(r.content)
    print(json.dumps(job["result"], indent=2)[:4000])
    print(f"saved result.json and {len(job['artifacts'])} artifacts to {out}/", file=sys.stderr)


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
    p = sub.add_parser("predict", help="top-k classes of images")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", required=True)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--url", default=default_url)
    e = sub.add_parser("explain", help="run an explanation job and save its artifacts")
    e.add_argument("kind")
    e.add_argument("images", nargs="+")
    e.add_argument("--model", required=True)
    e.add_argument("--params", default="", help="JSON object, see GET /v1/methods")
    e.add_argument("--out", default="inspector-out")
    e.add_argument("--url", default=default_url)
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
    elif args.command == "predict":
        cmd_predict(args)
    elif args.command == "explain":
        cmd_explain(args)


if __name__ == "__main__":
    main()
