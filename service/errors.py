"""Maps every error to ``{"error": {"type", "message", "details"}}`` with its status, in one place.

The error tree itself is ``schemas.errors`` (shared with the workers). Translated here:
request validation (422 ``bad_params``), Redis unreachable (503 ``queue_unavailable`` with
``Retry-After``), unknown routes and methods (404/405), and anything unexpected (500
``internal``: a bug, logged with its traceback).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from schemas.errors import ErrorBody, ErrorResponse, InspectorError, QueueUnavailable

log = logging.getLogger(__name__)


def error_response(err: InspectorError) -> JSONResponse:
    headers = {}
    retry = getattr(err, "retry_after_s", None)
    if retry is not None:
        headers["Retry-After"] = str(retry)
    return JSONResponse(err.body().model_dump(mode="json"), status_code=err.status, headers=headers)


def _plain(status: int, type_: str, message: str, details: object = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(type=type_, message=message, details=details))
    return JSONResponse(body.model_dump(mode="json"), status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InspectorError)
    async def inspector_error(_: Request, exc: InspectorError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = json.loads(json.dumps(exc.errors(), default=str))
        return _plain(422, "bad_params", "request validation failed", details)

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def redis_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("redis unavailable: %s", exc)
        return error_response(QueueUnavailable("the job queue (Redis) is unavailable; retry later"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        response = _plain(exc.status_code, type_, str(exc.detail))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # Allow lists every route of the path (RFC 9110), not the first only
            routes = [r for r in request.app.router.routes if r.matches(request.scope)[0] == Match.PARTIAL]
            response.headers["Allow"] = ", ".join(sorted({m for r in routes for m in getattr(r, "methods", ())}))
        return response

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _plain(500, "internal", "internal server error")
