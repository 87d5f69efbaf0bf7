"""What happens when a job ends: retry it, or notify its callback URLs (signed webhooks).

Every job is enqueued with RQ callbacks pointing here by dotted path (``on_success``,
``on_failure``). They run in the worker that ran the job or, for a job whose worker died,
in the worker whose heartbeat thread reaps it (RQ's ``StartedJobRegistry.cleanup``, with
``TimerDeathPenalty``: no SIGALRM outside the main thread). The API, which has no worker
code, reaps without callbacks and enqueues ``job_ended_task`` for a worker to notify.

Retries (``job_retries`` with ``job_retry_backoff_s``, RQ's ``Retry``): a job whose worker
died (``worker_lost``) or that crashed (``internal`` and other 5xx) runs again after the
backoff; a client error (an ``InspectorError`` with status < 500, e.g. ``bad_params``), a
cancel or a timeout ends it at once (a rerun would fail the same way). The worker counts
attempts in the job's meta (``attempt``, ``last_error``: ``workers.worker``).

Webhooks: when a job ends for good, ``job_ended`` stores its event (``keys.ended_key``) and
takes its callback URLs (``keys.callbacks_key``) in one Redis transaction, once (SET NX:
two reapers of one job notify once); the API adds URLs in a transaction too, so each URL
is notified exactly once however the two race. One
delivery job per URL runs on the ``high`` queue: ``deliver`` POSTs the event and raises
on anything but 2xx, so RQ retries it with backoff (``webhook_retries``,
``webhook_backoff_s``; the scheduler of a worker started ``with_scheduler`` moves them).

Signature (verify with ``verify_signature``)::

    X-Inspector-Timestamp: <unix seconds>
    X-Inspector-Signature: sha256=<hex HMAC-SHA256(webhook_secret, "<timestamp>." + body)>
    X-Inspector-Delivery:  <delivery id, the same on every retry of one delivery>

Receivers should reject timestamps more than a few minutes old (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import socket
import time
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import httpx
from redis import Redis
from rq import Queue, Retry, get_current_job
from rq.exceptions import AbandonedJobError, NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException

from schemas import keys
from schemas.errors import ErrorBody, InspectorError
from schemas.jobs import JobStatus, WebhookEvent, WebhookJob
from schemas.settings import Settings, get_settings

log = logging.getLogger(__name__)
DELIVER_FUNC = "workers.webhooks.deliver"
NOT_RETRIED = ("canceled", "timeout", "memory_budget")


class WebhookFailed(Exception):
    """A delivery that did not get a 2xx answer (retried by RQ)."""


class WebhookRefused(Exception):
    """A callback URL we will not call (not retried)."""


# --- the retry policy and the end of a job (RQ callbacks) ---------------------------------


def _error_of(job: Job, exc_type: type[BaseException] | None) -> dict[str, Any]:
    if "error" in job.meta:  # written by workers.tasks.run_job
        return dict(job.meta["error"])
    if exc_type is not None and issubclass(exc_type, AbandonedJobError):
        return {"type": "worker_lost", "message": "the worker running this job stopped (killed or crashed)"}
    if exc_type is not None and issubclass(exc_type, JobTimeoutException):
        return {"type": "timeout", "message": "the job exceeded its time limit"}
    return {"type": "internal", "message": exc_type.__name__ if exc_type else "the job failed"}


def on_success(job: Job, connection: Redis, result: Any, *args: Any, **kwargs: Any) -> None:
    job_ended(connection, job, JobStatus.finished, None)


def on_failure(
    job: Job, connection: Redis, exc_type: type[BaseException] | None, exc_value: BaseException | None, tb: Any
) -> None:
    """Retry the job (RQ does it after this returns, while ``retries_left`` > 0) or end it."""
    error = _error_of(job, exc_type)
    client_error = isinstance(exc_value, InspectorError) and exc_value.status < 500
    if not client_error and error["type"] not in NOT_RETRIED and (job.retries_left or 0) > 0:
        log.warning("job %s failed (%s); RQ will run it again", job.id, error["type"])
        return
    job.retries_left = 0  # RQ reads this right after the callback: no rerun
    status = JobStatus.canceled if error["type"] == "canceled" else JobStatus.failed
    job_ended(connection, job, status, error)


def event_for(job: Job, status: JobStatus, error: dict[str, Any] | None, settings: Settings) -> WebhookEvent:
    return WebhookEvent(
        job=WebhookJob(
            id=job.id,
            kind=job.meta.get("kind", "?"),
            model_id=job.meta.get("model_id", "?"),
            status=status,
            error=ErrorBody.model_validate(error) if error else None,
            url=f"{settings.public_url}/v1/jobs/{job.id}",
        )
    )


def job_ended(conn: Redis, job: Job, status: JobStatus, error: dict[str, Any] | None) -> None:
    """Store the job's terminal event and notify every callback URL registered so far."""
    settings = get_settings()
    event = event_for(job, status, error, settings).model_dump_json()
    with conn.pipeline(transaction=True) as pipe:
        pipe.set(keys.ended_key(job.id), event, ex=2 * settings.result_ttl_s, nx=True)
        pipe.smembers(keys.callbacks_key(job.id))
        first, urls = pipe.execute()
    if not first:
        return  # already ended and notified (e.g. reaped twice)
    for url in sorted(u.decode() for u in urls):
        enqueue_delivery(conn, settings, job.id, url)


def job_ended_task(payload: dict[str, Any]) -> dict[str, Any]:
    """RQ entry for what the API cannot do alone: notify ``urls`` of an already ended job
    (added after it ended), or end a job that ended without a worker's callback (canceled
    while queued, or reaped by the API after its worker died)."""
    current = get_current_job()
    assert current is not None
    conn: Redis = current.connection
    job_id = payload["job_id"]
    if payload.get("urls"):
        for url in payload["urls"]:
            enqueue_delivery(conn, get_settings(), job_id, url)
        return {"notified": len(payload["urls"])}
    try:
        job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    except NoSuchJobError:
        return {"ended": None}
    status = job.get_status()
    if status in (RQStatus.CANCELED, RQStatus.STOPPED):
        job_ended(conn, job, JobStatus.canceled, job.meta.get("error") or {"type": "canceled", "message": "canceled"})
    elif status == RQStatus.FAILED:
        result = job.latest_result()
        abandoned = result is not None and "AbandonedJobError" in (result.exc_string or "")
        job_ended(conn, job, JobStatus.failed, _error_of(job, AbandonedJobError if abandoned else None))
    return {"ended": job_id, "status": str(status)}


# --- deliveries ----------------------------------------------------------------------------


def _waits(settings: Settings) -> list[int]:
    backoff = settings.webhook_backoff_s or [0]
    return [backoff[min(i, len(backoff) - 1)] for i in range(settings.webhook_retries)]


def enqueue_delivery(conn: Redis, settings: Settings, job_id: str, url: str) -> Job:
    waits = _waits(settings)
    return Queue("high", connection=conn, serializer=JSONSerializer).enqueue(
        DELIVER_FUNC,
        {"job_id": job_id, "url": url},
        retry=Retry(max=len(waits), interval=waits) if waits else None,
        job_timeout=settings.webhook_timeout_s + 10,
        result_ttl=3600,
        failure_ttl=settings.result_ttl_s,
        description=f"webhook of {job_id}",
    )


def sign(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(
    secret: str, timestamp: str, body: bytes, signature: str, tolerance_s: float = 300, now: float | None = None
) -> bool:
    """What a receiver checks: the HMAC matches and the timestamp is recent."""
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except ValueError:
        return False
    return age <= tolerance_s and hmac.compare_digest(sign(secret, timestamp, body), signature)


def check_destination(url: str, settings: Settings) -> str | None:
    """Refuse URLs whose host resolves to a loopback, private, link-local or otherwise
    non-global address (SSRF into the cluster), unless ``webhook_allow_private``.

    Returns the checked address to connect to (None when private addresses are allowed):
    the delivery connects to it rather than resolving the name again, so a DNS answer
    that changes between the check and the connection (DNS rebinding) cannot redirect it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused(f"not an http(s) URL: {url!r}")
    if settings.webhook_allow_private:
        return None
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except OSError as e:
        raise WebhookFailed(f"cannot resolve {parts.hostname!r}: {e}") from None  # maybe transient
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    for address in addresses:
        if not address.is_global:
            raise WebhookRefused(f"{parts.hostname!r} resolves to non-public address {address}")
    if not addresses:
        raise WebhookFailed(f"{parts.hostname!r} has no address")
    return str(addresses[0])


def pinned(url: str, address: str | None) -> tuple[str, dict[str, str], dict[str, Any]]:
    """``(url, headers, extensions)`` of a request to ``url`` that connects to ``address``
    (None: resolve as usual) while the server sees the original host: the ``Host`` header,
    and for https the TLS server name (SNI) that the certificate is verified against."""
    if address is None:
        return url, {}, {}
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    target = urlunsplit(parts._replace(netloc=host if parts.port is None else f"{host}:{parts.port}"))
    extensions: dict[str, Any] = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    return target, {"Host": parts.netloc.rpartition("@")[2]}, extensions


def deliver(payload: dict[str, Any]) -> dict[str, Any]:
    """POST the job's signed event to one callback URL; raise (RQ retries) unless 2xx."""
    current = get_current_job()
    assert current is not None
    settings = get_settings()
    job_id, url = payload["job_id"], payload["url"]
    body = cast(bytes | None, current.connection.get(keys.ended_key(job_id)))
    if body is None:
        return {"skipped": "the job's event expired"}
    try:
        address = check_destination(url, settings)
    except WebhookRefused:
        current.retries_left = 0
        raise
    target, host, extensions = pinned(url, address)
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "model-inspector-webhook/1",
        "X-Inspector-Event": "job.ended",
        "X-Inspector-Delivery": current.id,
        "X-Inspector-Timestamp": timestamp,
        "X-Inspector-Signature": sign(settings.webhook_secret, timestamp, body),
        **host,
    }
    try:
        with httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False) as client:
            r = client.post(target, content=body, headers=headers, extensions=extensions)
    except httpx.HTTPError as e:
        raise WebhookFailed(f"{url}: {type(e).__name__}: {e}") from None
    if not 200 <= r.status_code < 300:
        raise WebhookFailed(f"{url} answered {r.status_code}")
    return {"status": r.status_code}
