"""The inspector web page: ``GET /`` and its static files under ``/ui/`` (``service/static/``).

Plain HTML, CSS and ES modules: no build step, nothing fetched from elsewhere (fonts, CDNs).
The page holds no data, so it needs no API key; it calls the API itself with the key the
user types (``Authorization: Bearer``). Out of the OpenAPI schema: it is not part of the API.
Every response carries a strict Content-Security-Policy: scripts, styles and connections
only from this origin, no inline script or style attribute, images also from ``blob:``
(artifacts are fetched with the key and shown as blob URLs).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC = Path(__file__).resolve().parent.parent / "static"

CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated by ETag: a new release is seen at once
}

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)


class _Static(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def install_ui(app: FastAPI) -> None:
    """``GET /`` and ``/ui/*`` (mounted apps never appear in the OpenAPI schema)."""
    app.include_router(router)
    app.mount("/ui", _Static(directory=STATIC), name="ui")
