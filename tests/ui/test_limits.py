"""What the page shows when the API says no: 429 with a Retry-After countdown, 503 as a
banner. Each against an API of its own (a rate limit of one request, a Redis that is down)."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from tests.conftest import free_port
from tests.ui.conftest import open_page
from tests.ui.stack import serve


def _served(settings):
    from service.main import create_app

    url, server, thread = serve(create_app(settings))
    return url, lambda: (setattr(server, "should_exit", True), thread.join(10))


def test_a_rate_limit_counts_down_and_holds_run(browser, stack):
    url, stop = _served(stack.settings.model_copy(update={"rate_limit_per_s": 0.02, "rate_limit_burst": 1}))
    page, _ = open_page(browser, url)
    try:
        page.select_option("#model", "digits-cnn")
        page.select_option("#kind", "saliency")
        page.click("#sample-digit")  # the top-5 request takes the one token
        page.wait_for_selector(".top5 li")
        with page.expect_response(lambda r: r.url.endswith("/v1/jobs/saliency")) as answer:
            page.click("#submit")
        assert answer.value.status == 429
        retry = int(answer.value.headers["retry-after"])
        error = page.locator("#form-error")
        expect(error).to_contain_text(f"retry in {retry} s")
        expect(page.locator("#submit")).to_be_disabled()
        expect(error).to_contain_text(f"retry in {retry - 1} s")  # it counts down
        assert re.search(r"retry in \d+ s$", error.inner_text())
    finally:
        page.context.close()
        stop()


def test_redis_down_is_a_banner(browser, stack):
    url, stop = _served(stack.settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))
    page, _ = open_page(browser, url)  # models and kinds need no Redis
    try:
        page.select_option("#model", "digits-cnn")
        with page.expect_response(lambda r: "/predict" in r.url) as answer:
            page.click("#sample-digit")
        assert answer.value.status == 503
        expect(page.locator("#banner")).to_be_visible()
        expect(page.locator("#banner")).to_contain_text(answer.value.json()["error"]["message"])
    finally:
        page.context.close()
        stop()
