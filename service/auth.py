"""API keys and tenants.

Keys are configured hashed, never in clear (the sha256 hex digest of the key), each with
the tenant it belongs to:

- inline, ``INSPECTOR_API_KEYS="acme:<sha256 hex> globex:<sha256 hex>"`` (commas or spaces);
- or a JSON file, ``INSPECTOR_API_KEYS_FILE=keys.json``, which can also set per-tenant limits
  (re-read within seconds when it changes, so keys rotate without a restart)::

      {"keys": [{"tenant": "acme", "sha256": "<hex>", "rate_limit_per_s": 5,
                 "rate_limit_burst": 10, "max_unfinished_jobs": 50}]}

A request sends its key as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. With
no key configured, auth is off and every request is the tenant ``anonymous`` (the local
``make run`` default). ``/healthz``, ``/readyz`` and ``/metrics`` never need a key.

``python -m service.auth new-key --tenant acme`` prints a fresh key and its config entry.
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, ValidationError

from schemas.errors import Unauthorized
from schemas.settings import Settings
from service.errors import error_response

TENANT_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Tenant:
    """Who a request is for; ``None`` limits mean the settings' defaults."""

    name: str
    rate_limit_per_s: float | None = None
    rate_limit_burst: int | None = None
    max_unfinished_jobs: int | None = None


class KeyEntry(BaseModel):
    tenant: str = Field(pattern=TENANT_PATTERN)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex sha256 of the key")
    rate_limit_per_s: float | None = Field(None, ge=0)
    rate_limit_burst: int | None = Field(None, gt=0)
    max_unfinished_jobs: int | None = Field(None, ge=0)

    def tenant_(self) -> Tenant:
        return Tenant(self.tenant, self.rate_limit_per_s, self.rate_limit_burst, self.max_unfinished_jobs)


class KeysFile(BaseModel):
    keys: list[KeyEntry]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_inline(text: str) -> list[KeyEntry]:
    """``"tenant:hex tenant2:hex"`` (commas or whitespace between entries)."""
    entries = []
    for item in text.replace(",", " ").split():
        tenant, sep, digest = item.rpartition(":")
        if not sep:
            raise ValueError(f"INSPECTOR_API_KEYS entry {item[:12]!r}... is not 'tenant:sha256hex'")
        entries.append(KeyEntry(tenant=tenant, sha256=digest.lower()))
    return entries


class KeyRing:
    """sha256(key) -> tenant. A configured but unreadable keys file is an error at start
    (fail closed), and a broken edit later keeps the last good keys (logged by the caller)."""

    def __init__(self, settings: Settings, recheck_s: float = 3.0) -> None:
        self.inline = parse_inline(settings.api_keys)
        self.path = Path(settings.api_keys_file) if settings.api_keys_file else None
        self.recheck_s = recheck_s
        self._lock = threading.Lock()
        self._checked = 0.0
        self._mtime: float | None = None
        self._tenants: dict[str, Tenant] = {}
        self._load()

    def _load(self) -> None:
        entries = list(self.inline)
        if self.path is not None:
            mtime = self.path.stat().st_mtime
            try:
                entries += KeysFile.model_validate_json(self.path.read_bytes()).keys
            except ValidationError as e:
                raise ValueError(f"invalid keys file {self.path}: {e}") from None
            self._mtime = mtime
        self._tenants = {e.sha256: e.tenant_() for e in entries}

    def _refresh(self) -> None:
        if self.path is None or time.monotonic() - self._checked < self.recheck_s:
            return
        with self._lock:
            self._checked = time.monotonic()
            try:
                if self.path.stat().st_mtime != self._mtime:
                    self._load()
            except (OSError, ValueError):
                pass  # keep the last good keys; a missing or broken file must not open the door

    @property
    def enabled(self) -> bool:
        return bool(self._tenants) or self.path is not None

    def lookup(self, key: str) -> Tenant | None:
        self._refresh()
        # A dict lookup of the digest: an attacker controls the key, not its hash, so the
        # lookup's timing tells nothing useful about stored digests.
        return self._tenants.get(hash_key(key))


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key")


async def authenticate(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header_key: Annotated[str | None, Security(_header)],
) -> Tenant:
    """The request's tenant; 401 without a valid key when keys are configured."""
    ring: KeyRing = request.app.state.keyring
    if not ring.enabled:
        return Tenant(ANONYMOUS)
    presented = [k for k in (bearer.credentials if bearer else None, header_key) if k]
    if not presented:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    # Every credential presented must be valid and name the same tenant: a bad one is never
    # skipped in favour of another (an Authorization header that is not Bearer is bad too).
    if bearer is None and "authorization" in request.headers:
        raise Unauthorized("the Authorization header must be 'Bearer <key>'")
    tenants = {ring.lookup(k) for k in presented}
    if None in tenants or len(tenants) != 1:
        raise Unauthorized("invalid API key")
    return tenants.pop()  # type: ignore[return-value]


TenantDep = Annotated[Tenant, Depends(authenticate)]


def install_auth(app: FastAPI, settings: Settings) -> None:
    app.state.keyring = KeyRing(settings)

    @app.exception_handler(Unauthorized)
    async def unauthorized(_: Request, exc: Unauthorized) -> JSONResponse:
        response = error_response(exc)
        response.headers["WWW-Authenticate"] = 'Bearer realm="model-inspector"'
        return response


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m service.auth", description="API keys for the inspector")
    sub = ap.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new-key", help="print a new random key and its hashed config entry")
    new.add_argument("--tenant", required=True)
    h = sub.add_parser("hash", help="print the config entry of an existing key")
    h.add_argument("--tenant", required=True)
    h.add_argument("key")
    args = ap.parse_args(argv)
    KeyEntry(tenant=args.tenant, sha256="0" * 64)  # validates the tenant name
    key = secrets.token_urlsafe(32) if args.command == "new-key" else args.key
    if args.command == "new-key":
        print(f"key (give it to the client; it is not stored):  {key}")
    print(f"entry for INSPECTOR_API_KEYS:                   {args.tenant}:{hash_key(key)}")


if __name__ == "__main__":
    main()
