"""The synchronous client: :class:`Client`, its :class:`Job` handles and ``client.datasets``.

    from model_inspector import Client

    with Client("http://127.0.0.1:8000", api_key=None) as c:
        print(c.predict("cat.png", model="efficientnet-lite0", top_k=3).predictions[0].top)
        job = c.submit("attribution", ["cat.png"], model="efficientnet-lite0", params={"method": "saliency"})
        job.wait(timeout=300, progress=True)
        heatmap = job.image("0-heatmap.png")
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
from PIL import Image

from model_inspector import _core, errors
from model_inspector._core import Call
from model_inspector.datasets import Datasets
from model_inspector.inputs import ImageLike
from schemas.jobs import JobView, PredictResponse
from schemas.models import ModelInfo

T = TypeVar("T")


class Client:
    """A connection to the API (``url``; ``api_key`` sent as ``Authorization: Bearer``).

    ``retries``/``backoff``/``max_wait``: see :class:`model_inspector._core.RetryPolicy`.
    ``sse=False`` follows jobs by polling only. ``transport`` is passed to httpx (proxies,
    mounted test apps).
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        retries: int = 4,
        backoff: float = 0.5,
        max_wait: float = 60.0,
        sse: bool = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url, self.timeout, self.sse = url.rstrip("/"), timeout, sse
        self.policy = _core.RetryPolicy(retries, backoff, max_wait)
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        self.datasets = Datasets(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- sending ---------------------------------------------------------------------------

    def send(self, call: Call[T]) -> T:
        """Send ``call``, retrying per the policy; its parsed answer, or the mapped error."""
        return call.parse(self._send(call, stream=False))

    def _send(self, call: Call[Any], stream: bool) -> httpx.Response:
        attempt = 0
        while True:
            delay: float | None
            call.rewind()
            try:
                response = self._http.send(call.request(self._http), stream=stream)
            except httpx.TransportError as e:
                delay = _core.retry_after_error(call, self.policy, attempt, self.url, e)
            else:
                delay = _core.retry_after_answer(call, self.policy, attempt, response)
                if delay is None:  # the answer
                    if response.status_code >= 400:
                        response.read()  # the error body, also of a streamed request
                    return _core.check(response)
                response.close()
            time.sleep(delay)
            attempt += 1

    # --- the API ---------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        return self.send(_core.models())

    def model(self, model_id: str) -> ModelInfo:
        return self.send(_core.model(model_id))

    def methods(self) -> dict[str, Any]:
        """Every job kind with the JSON schema of its params (``GET /v1/methods``)."""
        return self.send(_core.methods())

    def predict(self, images: ImageLike | Iterable[ImageLike], model: str, top_k: int = 5) -> PredictResponse:
        """Top-k classes of one image or several (one prediction per image, in order)."""
        return self.send(_core.predict(images, model, top_k))

    def submit(
        self,
        kind: str,
        images: ImageLike | Iterable[ImageLike] | None = None,
        *,
        model: str,
        params: Mapping[str, Any] | None = None,
        files: Mapping[str, Any] | None = None,
        dataset: str | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
        wait: float = 0,
    ) -> Job:
        """Submit a job of ``kind`` (see :meth:`methods`); returns its handle at once (or,
        with ``wait``, after up to that many seconds of the API waiting for it)."""
        call = _core.submit(kind, images, model, params, files, dataset, callback_url, idempotency_key, wait)
        return Job(self, self.send(call))

    def job(self, job_id: str) -> Job:
        """The handle of an existing job."""
        return Job(self, self.send(_core.job(job_id)))

    def _save(self, call: Call[Any], path: Path) -> None:
        """Stream the answer of ``call`` into ``path``."""
        response = self._send(call, stream=True)
        try:
            with open(path, "wb") as f:
                for chunk in response.iter_bytes():
                    f.write(chunk)
        finally:
            response.close()

    # --- following a job -------------------------------------------------------------------

    def _follow(self, job_id: str, deadline: float | None, report: _core.Reporter) -> JobView | None:
        """The terminal job over SSE; None when the stream is unusable (the caller polls)."""
        while True:
            read = _core.read_timeout(deadline)
            try:
                with self._http.stream(
                    "GET",
                    _core.events_path(job_id),
                    headers={"Accept": "text/event-stream"},
                    timeout=httpx.Timeout(self.timeout, read=read),
                ) as r:
                    if _core.sse_unusable(r):
                        r.read()
                        error = _core.sse_error(r)
                        if error is not None:
                            raise error
                        return None
                    parser = _core.SSEParser()
                    for line in r.iter_lines():
                        event = parser.feed(line)
                        view = _core.on_event(*event, report) if event else None
                        if view is not None:
                            return view
                        _core.check_deadline(deadline, job_id)
                return None  # closed before the end event (proxy, restart): poll instead
            except httpx.ReadTimeout:
                _core.check_deadline(deadline, job_id)  # else: no ping for SSE_READ_S; connect again
            except httpx.TransportError:
                return None

    def _poll(self, job_id: str, deadline: float | None, report: _core.Reporter, interval: float) -> JobView:
        while True:
            view = self.send(_core.job(job_id))
            report(view.id, view.status, view.progress)
            if view.status in _core.TERMINAL:
                return view
            _core.check_deadline(deadline, job_id)
            time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
            interval = min(interval * 1.5, 2.0)


class Job(_core.JobState):
    """A submitted job: its last view (``.view``, a ``schemas.jobs.JobView``), how to follow
    it, and its results."""

    def __init__(self, client: Client, view: JobView) -> None:
        super().__init__(view)
        self.client = client

    def refresh(self) -> Job:
        self.view = self.client.send(_core.job(self.id))
        return self

    def wait(self, timeout: float | None = None, progress: Any = None, poll_interval: float = 0.25) -> Job:
        """Block until the job ends (over SSE, polling when the stream is unavailable).

        ``progress``: a callable called with each :class:`~model_inspector._core.Update`, a tqdm
        bar, or True for a bar of its own. Raises :class:`~model_inspector.errors.WaitTimeout`
        after ``timeout`` seconds, :class:`~model_inspector.errors.JobFailed` /
        :class:`~model_inspector.errors.JobCanceled` when it ended without a result.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        report = _core.Reporter(progress)
        try:
            report(self.id, self.status, self.view.progress)
            if not self.done:
                view = self.client._follow(self.id, deadline, report) if self.client.sse else None
                self.view = view or self.client._poll(self.id, deadline, report, poll_interval)
                report(self.id, self.status, self.view.progress)
        finally:
            report.close()
        if self.status != "finished":
            raise errors.job_error(self)
        return self

    def cancel(self) -> Job:
        """Cancel a queued job; a running one stops at its next progress report."""
        self.view = self.client.send(_core.cancel(self.id))
        return self

    def artifact(self, name: str) -> bytes:
        return self.client.send(_core.artifact(self.id, name))

    def array(self, name: str) -> np.ndarray:
        """A ``.npy`` artifact (loaded without pickles)."""
        return np.load(io.BytesIO(self.artifact(name)), allow_pickle=False)

    def image(self, name: str) -> Image.Image:
        """A PNG artifact as a PIL image."""
        img = Image.open(io.BytesIO(self.artifact(name)))
        img.load()
        return img

    def download(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``result.json`` (the job) and every artifact (streamed) into ``directory``;
        waits for the job first when it has not ended."""
        if not self.done:
            self.wait()
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(self.view.model_dump_json(indent=2))
        for name in self.artifacts:
            self.client._save(_core.artifact(self.id, name), out / _core.local_name(name))
        return out

    def download_zip(self, path: str | os.PathLike[str]) -> Path:
        """Every artifact and ``result.json`` as one zip (``GET /v1/jobs/{id}/download``),
        streamed to ``path``; waits for the job first when it has not ended."""
        if not self.done:
            self.wait()
        self.client._save(_core.archive(self.id), Path(path))
        return Path(path)
