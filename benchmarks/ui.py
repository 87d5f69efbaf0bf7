"""The web page in headless chromium on loopback (issue 18's four figures), and its screenshots.

Starts the stack of ``tests/ui`` (redis-server, one worker, the API under uvicorn, all on
127.0.0.1) and drives Debian's chromium with Playwright:

1. **Page ready**: from navigation start to models and kinds listed (the page stamps
   ``performance.now()`` on ``<body data-ready>``), ``--loads`` loads, each in a fresh
   browser context (no HTTP cache). Target: p50 under 500 ms.
2. **Static size**: bytes of ``service/static`` (every file the page can load) and bytes
   one load transfers. Target: under 300 KB in all.
3. **Page overhead**: ``--jobs`` saliency jobs on digits-cnn submitted from the page (each
   distinct: targets 0-9, abs on and off, so none is a reused result): time from Run to the
   result drawn (images decoded) minus the job's own ``ended_at - created_at``. Target: p50
   under 300 ms.
4. **Progress latency**: one occlusion_map job on efficientnet-lite0 (the cat, many
   progress reports): for every progress change the page shows, the time since the worker
   wrote it to Redis (this process polls the job's meta every 5 ms). Target: within 0.5 s.

    python benchmarks/ui.py [--loads 20] [--jobs 20] [--json out.json]
    python benchmarks/ui.py --screenshots docs/   # the README's pictures, no figures

Needs chromium (``make tools``) and the prepared test models (``var/test-models``, made by
the first ``make test``, or by this script).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import MODELS_DIR, TEST_CACHE_DIR  # noqa: E402
from tests.ui.stack import Stack, ui_models_dir, ui_stack  # noqa: E402

STATIC = ROOT / "service" / "static"
# Records (Date.now(), text) of every change of the progress text, from the first paint on.
PROGRESS_PROBE = """
window.__progress = [];
document.addEventListener("DOMContentLoaded", () => {
  const el = document.getElementById("progress-text");
  new MutationObserver(() => window.__progress.push([Date.now(), el.textContent])).observe(el, {
    childList: true, characterData: true, subtree: true,
  });
});
"""


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": statistics.median(values),
        "p90": pct(values, 0.9),
        "min": min(values),
        "max": max(values),
    }


def load_once(page: Any, url: str) -> tuple[float, int]:
    """Milliseconds from navigation start to ready, and bytes of the page's own files."""
    responses: list[Any] = []
    page.on("response", lambda r: responses.append(r))
    page.goto(url)
    page.wait_for_selector("body[data-ready]")
    own = [r for r in responses if "/ui/" in r.url or r.url.rstrip("/") == url]
    return float(page.get_attribute("body", "data-ready")), sum(len(r.body()) for r in own)


def wait_for_new_result(page: Any, last: str | None, timeout_ms: int = 300_000) -> str:
    """Waits until the result of a job other than ``last`` is drawn; returns its id."""
    sel = "#result[data-job]" if last is None else f"#result[data-job]:not([data-job='{last}'])"
    page.wait_for_selector(sel, timeout=timeout_ms)
    return page.get_attribute("#result", "data-job")


def page_ready(browser: Any, url: str, loads: int) -> dict[str, Any]:
    times, transferred = [], []
    for _ in range(loads):
        ctx = browser.new_context()
        page = ctx.new_page()
        ms, size = load_once(page, url)
        times.append(ms)
        transferred.append(size)
        ctx.close()
    files = [p for p in STATIC.rglob("*") if p.is_file()]
    return {
        "ready_ms": summary(times),
        "static_bytes": sum(p.stat().st_size for p in files),
        "static_files": len(files),
        "bytes_per_load": max(transferred),
    }


def prepare(page: Any, url: str | None, model: str, kind: str, sample: str) -> None:
    """Opens ``url`` (None: the page as it is), picks the model, the analysis and a sample
    image, and waits for the image's top-5."""
    if url:
        page.goto(url)
        page.wait_for_selector("body[data-ready]")
    page.select_option("#model", model)
    page.select_option("#kind", kind)
    page.click(sample)
    page.wait_for_selector(".top5 li", timeout=120_000)


def overhead(browser: Any, stack: Stack, jobs: int) -> dict[str, Any]:
    import httpx

    page = browser.new_page()
    prepare(page, stack.url, "digits-cnn", "saliency", "#sample-digit")
    rows, last = [], None
    for i in range(jobs):
        page.fill('[data-field="target"] input', str(i % 10))
        page.set_checked('[data-field="abs"] input', i < 10)
        page.click("#submit")
        last = wait_for_new_result(page, last)
        page_ms = float(page.get_attribute("#result", "data-drawn-at")) - float(
            page.get_attribute("body", "data-submitted")
        )
        view = httpx.get(f"{stack.url}/v1/jobs/{last}").json()
        assert not view["deduplicated"], "each job must be new"
        job_ms = (_ts(view["ended_at"]) - _ts(view["created_at"])) * 1000
        rows.append({"page_ms": page_ms, "job_ms": job_ms, "overhead_ms": page_ms - job_ms})
    page.close()
    return {
        "overhead_ms": summary([r["overhead_ms"] for r in rows]),
        "submit_to_drawn_ms": summary([r["page_ms"] for r in rows]),
        "job_ms": summary([r["job_ms"] for r in rows]),
    }


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def progress_latency(browser: Any, stack: Stack) -> dict[str, Any]:
    from redis import Redis

    from service import jobs as service_jobs

    ctx = browser.new_context()
    ctx.add_init_script(PROGRESS_PROBE)
    page = ctx.new_page()
    prepare(page, stack.url, "efficientnet-lite0", "occlusion_map", "#sample-cat")
    page.fill('[data-field="occluder"] input', "16")
    page.fill('[data-field="stride"] input', "8")
    conn = Redis.from_url(stack.settings.redis_url)  # type: ignore[attr-defined]
    written: list[tuple[float, int]] = []
    stop = threading.Event()
    with page.expect_response(lambda r: r.url.endswith("/v1/jobs/occlusion_map")) as answer:
        page.click("#submit")
    job_id = answer.value.json()["id"]

    def watch() -> None:
        job = service_jobs.fetch(conn, job_id, "anonymous")
        seen = None
        while not stop.is_set():
            done = (job.get_meta(refresh=True).get("progress") or {}).get("done")
            if done != seen and done is not None:
                written.append((time.time(), done))
                seen = done
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    page.wait_for_selector(f"#result[data-job='{job_id}']", timeout=300_000)
    stop.set()
    watcher.join(5)
    shown = page.evaluate("window.__progress")
    ctx.close()
    first_written = {}
    for t, done in written:
        first_written.setdefault(done, t)
    lags = []
    for t_ms, text in shown:
        m = re.search(r"started: .* (\d+)/(\d+)$", text)
        if m and int(m.group(1)) in first_written and int(m.group(1)) < int(m.group(2)):
            lags.append(t_ms - first_written[int(m.group(1))] * 1000)
    return {"progress_lag_ms": summary(lags), "changes_written": len(first_written), "changes_shown": len(lags)}


def screenshots(browser: Any, stack: Stack, out: Path) -> list[Path]:
    """The main views: a saliency result on the cat, U Analysis and compare on a digit, a phone."""
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(stack.url)
    page.wait_for_selector("body[data-ready]")  # models and kinds listed

    def job(model: str, kind: str, sample: str, setup: Any = None) -> None:
        prepare(page, None, model, kind, sample)
        if setup:
            setup()
        last = page.get_attribute("#result", "data-job")
        page.click("#submit")
        wait_for_new_result(page, last)
        page.wait_for_timeout(300)

    job("efficientnet-lite0", "saliency", "#sample-cat")
    shots.append(out / "ui-saliency.jpg")  # photos: a JPEG is a quarter of the PNG
    page.screenshot(path=shots[-1], full_page=True, type="jpeg", quality=85)

    def u_setup() -> None:
        page.select_option('[data-field="order"] select', "decreasing")
        page.select_option('[data-field="noise"] select', "gaussian")

    job("digits-cnn", "u_analysis", "#sample-digit", u_setup)
    shots.append(out / "ui-u-analysis.png")
    page.locator("#result-panel").screenshot(path=shots[-1])

    def compare_setup() -> None:
        rows = page.locator('[data-field="methods"] > ol.rows > li')
        while rows.count() > 3:
            rows.last.locator(":scope > button.remove").click()

    job("digits-cnn", "compare", "#sample-digit", compare_setup)
    shots.append(out / "ui-compare.png")
    page.locator("#result-panel").screenshot(path=shots[-1])
    page.set_viewport_size({"width": 390, "height": 844})
    page.evaluate("window.scrollTo(0, 0)")
    shots.append(out / "ui-phone.png")
    page.screenshot(path=shots[-1])
    page.close()
    return shots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loads", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--screenshots", type=Path, help="write the README's screenshots here instead")
    args = ap.parse_args()
    chromium = os.environ.get("INSPECTOR_TEST_CHROMIUM") or shutil.which("chromium")
    if not chromium:
        sys.exit("chromium is not installed (make tools)")
    from playwright.sync_api import sync_playwright

    from workers.registry import prepare_builtin_models

    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    prepare_builtin_models(MODELS_DIR)
    with tempfile.TemporaryDirectory() as tmp, ui_stack(ui_models_dir(MODELS_DIR, Path(tmp)), TEST_CACHE_DIR) as stack:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=chromium, args=["--no-sandbox"] if os.geteuid() == 0 else []
            )
            if args.screenshots:
                for path in screenshots(browser, stack, args.screenshots):
                    print(path)
                return
            page_ready(browser, stack.url, 2)  # warm-up: first load of the browser and the API
            result: dict[str, Any] = {"load_average": os.getloadavg()}
            result.update(page_ready(browser, stack.url, args.loads))
            result.update(overhead(browser, stack, args.jobs))
            result.update(progress_latency(browser, stack))
            result["load_average_after"] = os.getloadavg()
            browser.close()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
