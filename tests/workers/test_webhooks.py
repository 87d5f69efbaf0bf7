"""Webhook destinations: the address checked is the address connected to (no DNS rebinding)."""

from __future__ import annotations

import http.server
import threading

import httpx
import pytest

from schemas.settings import Settings
from tests.conftest import free_port
from workers.webhooks import WebhookRefused, check_destination, pinned


def test_pinned_request_targets_the_address_and_keeps_the_host():
    assert pinned("https://hooks.example.com/cb?x=1", "93.184.216.34") == (
        "https://93.184.216.34/cb?x=1", {"Host": "hooks.example.com"}, {"sni_hostname": "hooks.example.com"}
    )  # fmt: skip
    assert pinned("http://hooks.example.com:8080/cb", "2606:2800:220:1::1") == (
        "http://[2606:2800:220:1::1]:8080/cb", {"Host": "hooks.example.com:8080"}, {}
    )  # fmt: skip
    assert pinned("http://localhost:9/cb", None) == ("http://localhost:9/cb", {}, {})


def test_check_destination_refuses_private_answers_and_returns_the_public_one():
    strict = Settings(webhook_allow_private=False)
    with pytest.raises(WebhookRefused):
        check_destination("http://localhost:8080/cb", strict)
    with pytest.raises(WebhookRefused):
        check_destination("http://10.1.2.3/cb", strict)
    assert check_destination("https://93.184.216.34/cb", strict) == "93.184.216.34"
    assert check_destination("http://localhost:8080/cb", Settings(webhook_allow_private=True)) is None


def test_a_pinned_delivery_never_resolves_the_name_again():
    """``hook.invalid`` resolves nowhere (RFC 2606), so the POST can only reach the server
    through the pinned address, and the server still sees the original Host."""
    seen: list[tuple[str, bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            seen.append((self.headers["Host"], self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    port = free_port()
    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://hook.invalid:{port}/cb"
        with pytest.raises(httpx.ConnectError):
            httpx.post(url, content=b"{}", timeout=5)  # the name itself goes nowhere
        target, host, extensions = pinned(url, "127.0.0.1")
        with httpx.Client(timeout=5) as client:
            r = client.post(target, content=b'{"ok": 1}', headers=host, extensions=extensions)
        assert r.status_code == 204 and seen == [(f"hook.invalid:{port}", b'{"ok": 1}')]
    finally:
        server.shutdown()
