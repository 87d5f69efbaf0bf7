"""Reading a submission (multipart or JSON) into validated images and fields.

multipart/form-data: ``image`` (one or more files; ``images`` also accepted), ``model_id``,
``params`` (JSON text), ``top_k``, ``callback_url``. application/json:
``schemas.jobs.Base64Images``. Unknown fields are refused (422), not ignored.
Limits come from settings: bytes per image, pixels per image, images per request; the whole
body is capped before it is read (``Content-Length``) and while it arrives
(``BodySizeLimit``, also for chunked bodies that announce no length).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import Headers, UploadFile
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas.errors import BadImage, BadParams, InspectorError, PayloadTooLarge, UnsupportedMedia
from schemas.jobs import Base64Images
from schemas.settings import Settings
from schemas.stored_images import is_plain_jpeg
from service.errors import error_response
from service.images import DecodedImage, finish_image, open_image

IMAGE_FIELDS = ("image", "images")
TEXT_FIELDS = ("model_id", "params", "top_k", "callback_url")
MAX_URL_LENGTH = 2048
MAX_PARAMS_DEPTH = 16
"""Deepest nesting of ``params`` (the deepest schema, ``u_sweep``'s methods, needs 4)."""
MAX_NUMBER_CHARS = 64


@dataclass
class Submission:
    model_id: str | None
    images: list[DecodedImage]
    params: dict[str, Any] = field(default_factory=dict)
    top_k: int | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    callback_url: str | None = None


def body_limit(settings: Settings) -> int:
    """Largest request body accepted: every image at its limit plus room for the fields."""
    return settings.max_upload_bytes * settings.max_images_per_request * 4 // 3 + 1024 * 1024


def dataset_body_limit(settings: Settings) -> int:
    """Largest body of ``POST /v1/datasets``: a zip at the tenant's whole quota, plus room."""
    return settings.max_dataset_bytes + 1024 * 1024


class BodySizeLimit:
    """ASGI middleware: a body over ``limit`` bytes (``overrides``: another limit for paths
    under a prefix) is refused with 413 ``payload_too_large``: at once when its
    Content-Length says so, else as soon as the bytes received pass it (a chunked upload
    cannot fill the disk)."""

    def __init__(self, app: ASGIApp, limit: int, overrides: dict[str, int] | None = None) -> None:
        self.app, self.default, self.overrides = app, limit, overrides or {}

    def _limit(self, path: str) -> int:
        return next((n for prefix, n in self.overrides.items() if path.startswith(prefix)), self.default)

    def _error(self, limit: int) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body is over the limit of {limit} bytes", details={"limit": limit})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope.get("path", ""))
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await error_response(self._error(limit))(scope, receive, send)
            return
        received, started = 0, False

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise self._error(limit)  # a route answers it; one that escapes is answered below
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, watched)
        except Exception as e:
            over = e.subgroup(PayloadTooLarge) if isinstance(e, ExceptionGroup) else e
            if started or not isinstance(over, PayloadTooLarge | ExceptionGroup):
                raise
            await error_response(self._error(limit))(scope, receive, send)


def literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``host`` stands for when it is an IP literal, None for a host name. Also
    the IPv4 forms that ``inet_aton`` and so every resolver accept besides dotted quads
    (``127.1``, ``2130706433``, ``0x7f000001``, ``0177.0.0.1``): a URL naming one of those
    reaches that address."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def check_callback_url(url: str, settings: Settings) -> None:
    """A job's ``callback_url``: absolute http(s), no credentials, and (unless
    ``webhook_allow_private``) not a loopback or private address. The worker checks the
    resolved addresses again before each delivery."""
    if not settings.webhook_secret:
        raise BadParams("callback_url is not available: this server has no webhook secret configured")
    if len(url) > MAX_URL_LENGTH:
        raise BadParams(f"callback_url is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        raise BadParams("callback_url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadParams("callback_url must be an absolute http:// or https:// URL")
    if parts.username or parts.password:
        raise BadParams("callback_url must not contain credentials")
    if not settings.webhook_allow_private:
        address = literal_address(parts.hostname)
        if address is None:  # a host name: resolved and checked at delivery
            private = parts.hostname.lower() == "localhost" or parts.hostname.lower().endswith(".localhost")
        else:
            private = not address.is_global
        if private:
            raise BadParams("callback_url points to a loopback or private address")


INLINE_DECODE_PIXELS = 400_000
"""A request whose images hold at most this many pixels in all is decoded on the event loop
(about 2 ms for a JPEG photo of that size): a hand-off to a thread costs more than that
decode. Larger ones go to a thread (``_decoded``)."""


def _open_all(raw: list[bytes], settings: Settings, allow_none: bool) -> list[Image.Image]:
    """Every upload opened and checked up to its header (cheap: nothing decoded yet)."""
    if not raw and not allow_none:
        raise BadImage("no image in the request (send an 'image' file or 'image_base64')")
    if len(raw) > settings.max_images_per_request:
        raise PayloadTooLarge(
            f"{len(raw)} images; the limit is {settings.max_images_per_request} per request",
            details={"limit": settings.max_images_per_request},
        )
    return [open_image(b, settings.max_upload_bytes, settings.max_image_pixels) for b in raw]


def _number(text: str) -> str:
    if len(text) > MAX_NUMBER_CHARS:
        raise BadParams(f"params holds a number of {len(text)} characters; the limit is {MAX_NUMBER_CHARS}")
    return text


def check_bounds(value: Any) -> Any:
    """``value`` (parsed params) when no container in it is nested deeper than
    ``MAX_PARAMS_DEPTH`` and no integer is beyond ±2**63; else ``BadParams``. Iterative:
    the depth itself cannot exhaust the stack."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_PARAMS_DEPTH:
                raise BadParams(f"params are nested deeper than {MAX_PARAMS_DEPTH} levels")
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
        elif isinstance(item, int) and not -(2**63) <= item < 2**63:
            raise BadParams("params holds an integer beyond the 64-bit range")
    return value


async def _decoded(raw: list[bytes], settings: Settings, allow_none: bool, verify: bool) -> list[DecodedImage]:
    """The uploads checked, decoded and normalised (``verify``: see ``finish_image``). Past
    ``INLINE_DECODE_PIXELS`` to decode, the decoding runs in a worker thread: 8 images of
    40 MP take seconds, during which the event loop must go on answering (``/healthz``,
    other requests). Pillow's decoders release the GIL."""
    opened = _open_all(raw, settings, allow_none)

    def finish() -> list[DecodedImage]:
        return [finish_image(img, b, verify) for img, b in zip(opened, raw, strict=True)]

    if sum(img.width * img.height for img in opened if verify or not is_plain_jpeg(img)) <= INLINE_DECODE_PIXELS:
        return finish()
    return await asyncio.to_thread(finish)


def _parse_json_body(body: bytes) -> tuple[Base64Images, list[bytes], dict[str, bytes]]:
    """The JSON form: validated fields, decoded images and extra files (run in a thread: a
    body of several megabytes of base64 takes a while)."""
    try:
        data = Base64Images.model_validate_json(body)
    except ValidationError as e:
        # Without the inputs: they may be huge, or bytes that are not UTF-8.
        details = json.loads(e.json(include_url=False, include_input=False))
        raise BadParams("invalid JSON body", details=details) from None
    encoded = ([data.image_base64] if data.image_base64 else []) + (data.images_base64 or [])
    try:
        raw = [base64.b64decode(s, validate=True) for s in encoded]
        extra = {k: base64.b64decode(v, validate=True) for k, v in data.files_base64.items()}
    except (binascii.Error, ValueError):
        raise BadImage("image_base64 / files_base64 is not valid base64") from None
    return data, raw, extra


def _params(text: Any) -> dict[str, Any]:
    """The ``params`` JSON object, its depth and numbers bounded before any validation (a deep
    or huge document must be a 422, not a RecursionError or a 4,300-digit ValueError)."""
    if text in (None, ""):
        return {}
    if isinstance(text, dict):
        return check_bounds(text)
    try:
        value = json.loads(text, parse_int=lambda t: int(_number(t)), parse_float=lambda t: float(_number(t)))
    except (json.JSONDecodeError, TypeError, RecursionError):
        raise BadParams("params must be a JSON object") from None
    if not isinstance(value, dict):
        raise BadParams("params must be a JSON object")
    return check_bounds(value)


def _top_k(value: Any) -> int | None:
    if value in (None, ""):
        return None
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise BadParams("top_k must be an integer") from None
    if not 1 <= k <= 1000:
        raise BadParams("top_k must be between 1 and 1000")
    return k


def _check_files(files: dict[str, bytes], allowed: tuple[str, ...], settings: Settings) -> dict[str, bytes]:
    for name, data in files.items():
        if name not in allowed:
            raise BadParams(f"unexpected upload {name!r}", details={"accepted": list(allowed)})
        if len(data) > settings.max_upload_bytes:
            raise PayloadTooLarge(f"upload {name!r} is over the limit of {settings.max_upload_bytes} bytes")
    return files


async def read_submission(
    request: Request,
    settings: Settings,
    files: tuple[str, ...] = (),
    allow_no_image: bool = False,
    verify: bool = True,
) -> Submission:
    """Parse the body; ``files`` names the extra uploads accepted besides images. ``verify``
    (see ``service.images.finish_image``): False only where a worker decodes the images at
    once and answers a corrupt one with 400 (predicts)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > body_limit(settings):
        raise PayloadTooLarge(f"request body of {length} bytes is over the limit of {body_limit(settings)}")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(
                max_files=settings.max_images_per_request + 1, max_part_size=settings.max_upload_bytes + 1
            )
        except InspectorError:
            raise  # BodySizeLimit's 413
        except Exception as e:  # starlette raises its own MultiPartException, HTTPException...
            raise BadParams(f"cannot parse the multipart body: {getattr(e, 'detail', e)}") from None
        raw: list[bytes] = []
        extra: dict[str, bytes] = {}
        for name, item in form.multi_items():
            if name in IMAGE_FIELDS:
                if not isinstance(item, UploadFile):
                    raise BadParams(f"'{name}' must be a file")
                raw.append(await item.read(settings.max_upload_bytes + 1))
            elif isinstance(item, UploadFile):
                extra[name] = await item.read(settings.max_upload_bytes + 1)
            elif name not in TEXT_FIELDS:
                raise BadParams(f"unknown field {name!r}", details={"accepted": [*IMAGE_FIELDS, *TEXT_FIELDS]})
        model_id = form.get("model_id")
        callback_url = form.get("callback_url")
        params = _params(form.get("params"))
        return Submission(
            model_id=model_id if isinstance(model_id, str) else None,
            images=await _decoded(raw, settings, allow_no_image, verify),
            params=params,
            top_k=_top_k(form.get("top_k")),
            files=_check_files(extra, files, settings),
            callback_url=callback_url if isinstance(callback_url, str) and callback_url else None,
        )
    if ctype == "application/json":
        body = await request.body()
        if len(body) > body_limit(settings):
            raise PayloadTooLarge("request body is over the limit")
        data, raw, extra = await asyncio.to_thread(_parse_json_body, body)
        return Submission(
            data.model_id,
            await _decoded(raw, settings, allow_no_image, verify),
            data.params,
            _top_k(data.top_k),
            _check_files(extra, files, settings),
            data.callback_url,
        )
    raise UnsupportedMedia(
        f"content type {ctype or 'none'!r}; send multipart/form-data or application/json",
        details={"supported": ["multipart/form-data", "application/json"]},
    )


async def warm_up(settings: Settings) -> None:
    """Read one multipart submission of a small JPEG, as predicts and jobs do, when the API
    starts: the first request must not pay for the first use of that path (python-multipart's
    import, Pillow's plugins and JPEG decoder: about 30 ms)."""
    import io

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 30, 200)).save(buf, "JPEG")
    boundary = "inspector-warm-up"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="w.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + buf.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    for verify in (True, False):
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        headers = [
            (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        scope = {"type": "http", "method": "POST", "path": "/", "headers": headers, "query_string": b""}
        await read_submission(Request(scope, receive), settings, verify=verify)
