"""The page's route and files without a browser: headers, schema, size, no external request."""

from __future__ import annotations

import hashlib
import re
from html.parser import HTMLParser
from pathlib import Path

from fastapi.testclient import TestClient

from service.routes.ui import STATIC

ROOT = Path(__file__).resolve().parents[2]


def test_the_page_is_served_with_a_strict_policy_and_stays_out_of_the_schema(api):
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'self'" and csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
    assert csp["img-src"] == "'self' blob: data:" and csp["connect-src"] == "'self'"
    assert csp["object-src"] == "'none'" and csp["frame-ancestors"] == "'none'"
    assert page.headers["x-content-type-options"] == "nosniff"
    script = api.get("/ui/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert script.headers["content-security-policy"] == page.headers["content-security-policy"]
    assert api.get("/ui/samples/chelsea.jpg").headers["content-type"] == "image/jpeg"
    missing = api.get("/ui/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    paths = api.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith("/ui")]


def test_the_page_needs_no_key_where_the_api_does(settings):
    from service.main import create_app

    keyed = settings.model_copy(update={"api_keys": f"t:{hashlib.sha256(b'k').hexdigest()}"})
    with TestClient(create_app(keyed)) as c:
        assert c.get("/").status_code == 200 and c.get("/ui/app.js").status_code == 200
        assert c.get("/v1/models").status_code == 401


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script" and not a.get("src"):
            self.problems.append("inline <script>")
        self.problems += [f"{tag} {k}=" for k in a if k.startswith("on") or k == "style"]
        self.refs += [v for k, v in a.items() if k in ("src", "href") and v and v.startswith("/ui/")]


def test_static_files_are_small_self_contained_and_inline_free():
    files = [p for p in STATIC.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 300 * 1024  # issue 18: under 300 KB in all
    markup = _Markup()
    markup.feed((STATIC / "index.html").read_text())
    assert markup.problems == []  # the policy would block them anyway: none at all
    for ref in markup.refs:
        assert (STATIC / ref.removeprefix("/ui/")).is_file(), ref
    for p in files:
        if p.suffix in (".js", ".css", ".html"):
            text = p.read_text()
            assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), f"{p.name} refers to another host"
            assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "eval(" not in text, p.name


def test_the_api_image_carries_the_page():
    dockerfile = (ROOT / "docker" / "Dockerfile.api").read_text()
    assert "COPY service service" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not [i for i in ignored if i.startswith(("service", "**/*.js", "**/*.css", "**/*.html", "*.js"))]
