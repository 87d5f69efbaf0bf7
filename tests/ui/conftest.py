"""Browser tests of the web page: Debian's chromium driven by Playwright (launched with the
chromium's own executable, never ``playwright install``), against a real redis-server,
worker and API served by uvicorn (``tests.ui.stack``). One browser and one stack for the
whole of ``tests/ui``; each test gets a fresh browser context (empty localStorage).

``make test`` installs chromium with apt (its ``tools`` step); only where that cannot
happen (no root) are these tests skipped, saying so.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import TEST_CACHE_DIR
from tests.ui.stack import KEY, Stack, ui_models_dir, ui_stack

CHROMIUM = os.environ.get("INSPECTOR_TEST_CHROMIUM") or shutil.which("chromium")


@pytest.fixture(scope="session")
def chromium_path() -> str:
    if not CHROMIUM:
        why = "needs root to apt-get install it" if os.geteuid() != 0 else "apt-get install chromium failed"
        pytest.skip(f"chromium is not installed ({why}; `make test` installs it): browser tests skipped")
    return CHROMIUM


# Package scope: the stack and the browser go when tests/ui is done, not at the session's
# end (the rest of the suite gets their memory back, and no Playwright loop outlives them).
@pytest.fixture(scope="package")
def stack(models_dir: Path, tmp_path_factory: pytest.TempPathFactory, chromium_path: str) -> Iterator[Stack]:
    with ui_stack(ui_models_dir(models_dir, tmp_path_factory.mktemp("ui-models")), TEST_CACHE_DIR) as s:
        yield s


@pytest.fixture(scope="package")
def browser(chromium_path: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # root (CI containers) cannot use chromium's user-namespace sandbox
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        b = p.chromium.launch(executable_path=chromium_path, args=args)
        yield b
        b.close()


@dataclass
class Seen:
    """What happened in a page: dialogs opened, requests made, script errors."""

    dialogs: list[str] = field(default_factory=list)
    requests: list = field(default_factory=list)  # playwright Request objects
    errors: list[str] = field(default_factory=list)


def open_page(browser, url: str, width: int = 1200, ready: bool = True):
    """A fresh context and page at ``url``, waiting (``ready``) until models and kinds are listed."""
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    seen = Seen()

    def dialog(d) -> None:
        seen.dialogs.append(d.message)
        d.dismiss()

    page.on("dialog", dialog)
    page.on("request", lambda r: seen.requests.append(r))
    page.on("pageerror", lambda e: seen.errors.append(str(e)))
    page.goto(url)
    if ready:
        page.wait_for_selector("body[data-ready]")
    return page, seen


@pytest.fixture
def page(browser, stack: Stack):
    page, seen = open_page(browser, stack.url)
    page.seen = seen
    yield page
    assert not seen.errors, f"script errors in the page: {seen.errors}"
    page.context.close()


__all__ = ["KEY", "open_page"]
