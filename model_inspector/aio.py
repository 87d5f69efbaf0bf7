"""The asyncio client: :class:`AsyncClient` and :class:`AsyncJob`, the same methods as
:class:`~model_inspector.Client` and :class:`~model_inspector.Job`, awaited.

    async with AsyncClient(url) as c:
        jobs = [await c.submit("attribution", img, model="digits-cnn") for img in images]
        await asyncio.gather(*(j.wait() for j in jobs))
"""

from __future__ import annotations

import asyncio
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
from model_inspector.datasets import AsyncDatasets
from model_inspector.inputs import ImageLike
from schemas.jobs import JobView, PredictResponse
from schemas.models import ModelInfo

T = TypeVar("T")


class AsyncClient:
    """See :class:`~model_inspector.Client` for the arguments."""

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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url, self.timeout, self.sse = url.rstrip("/"), timeout, sse
        self.policy = _core.RetryPolicy(retries, backoff, max_wait)
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        self.datasets = AsyncDatasets(self)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, call: Call[T]) -> T:
        return call.parse(await self._send(call, stream=False))

    async def _send(self, call: Call[Any], stream: bool) -> httpx.Response:
        attempt = 0
        while True:
            delay: float | None
            call.rewind()
            try:
                response = await self._http.send(call.request(self._http), stream=stream)
            except httpx.TransportError as e:
                delay = _core.retry_after_error(call, self.policy, attempt, self.url, e)
            else:
                delay = _core.retry_after_answer(call, self.policy, attempt, response)
                if delay is None:  # the answer
                    if response.status_code >= 400:
                        await response.aread()  # the error body, also of a streamed request
                    return _core.check(response)
                await response.aclose()
            await asyncio.sleep(delay)
            attempt += 1

    async def models(self) -> list[ModelInfo]:
        return await self.send(_core.models())

    async def model(self, model_id: str) -> ModelInfo:
        return await self.send(_core.model(model_id))

    async def methods(self) -> dict[str, Any]:
        return await self.send(_core.methods())

    async def predict(self, images: ImageLike | Iterable[ImageLike], model: str, top_k: int = 5) -> PredictResponse:
        return await self.send(_core.predict(images, model, top_k))

    async def submit(
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
    ) -> AsyncJob:
        call = _core.submit(kind, images, model, params, files, dataset, callback_url, idempotency_key, wait)
        return AsyncJob(self, await self.send(call))

    async def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, await self.send(_core.job(job_id)))

    async def _save(self, call: Call[Any], path: Path) -> None:
        response = await self._send(call, stream=True)
        try:
            with open(path, "wb") as f:
                async for chunk in response.aiter_bytes():
                    f.write(chunk)
        finally:
            await response.aclose()

    async def _follow(self, job_id: str, deadline: float | None, report: _core.Reporter) -> JobView | None:
        while True:
            read = _core.read_timeout(deadline)
            try:
                async with self._http.stream(
                    "GET",
                    _core.events_path(job_id),
                    headers={"Accept": "text/event-stream"},
                    timeout=httpx.Timeout(self.timeout, read=read),
                ) as r:
                    if _core.sse_unusable(r):
                        await r.aread()
                        error = _core.sse_error(r)
                        if error is not None:
                            raise error
                        return None
                    parser = _core.SSEParser()
                    async for line in r.aiter_lines():
                        event = parser.feed(line)
                        view = _core.on_event(*event, report) if event else None
                        if view is not None:
                            return view
                        _core.check_deadline(deadline, job_id)
                return None
            except httpx.ReadTimeout:
                _core.check_deadline(deadline, job_id)
            except httpx.TransportError:
                return None

    async def _poll(self, job_id: str, deadline: float | None, report: _core.Reporter, interval: float) -> JobView:
        while True:
            view = await self.send(_core.job(job_id))
            report(view.id, view.status, view.progress)
            if view.status in _core.TERMINAL:
                return view
            _core.check_deadline(deadline, job_id)
            await asyncio.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
            interval = min(interval * 1.5, 2.0)


class AsyncJob(_core.JobState):
    """See :class:`~model_inspector.Job`."""

    def __init__(self, client: AsyncClient, view: JobView) -> None:
        super().__init__(view)
        self.client = client

    async def refresh(self) -> AsyncJob:
        self.view = await self.client.send(_core.job(self.id))
        return self

    async def wait(self, timeout: float | None = None, progress: Any = None, poll_interval: float = 0.25) -> AsyncJob:
        deadline = None if timeout is None else time.monotonic() + timeout
        report = _core.Reporter(progress)
        try:
            report(self.id, self.status, self.view.progress)
            if not self.done:
                view = await self.client._follow(self.id, deadline, report) if self.client.sse else None
                self.view = view or await self.client._poll(self.id, deadline, report, poll_interval)
                report(self.id, self.status, self.view.progress)
        finally:
            report.close()
        if self.status != "finished":
            raise errors.job_error(self)
        return self

    async def cancel(self) -> AsyncJob:
        self.view = await self.client.send(_core.cancel(self.id))
        return self

    async def artifact(self, name: str) -> bytes:
        return await self.client.send(_core.artifact(self.id, name))

    async def array(self, name: str) -> np.ndarray:
        return np.load(io.BytesIO(await self.artifact(name)), allow_pickle=False)

    async def image(self, name: str) -> Image.Image:
        img = Image.open(io.BytesIO(await self.artifact(name)))
        img.load()
        return img

    async def download(self, directory: str | os.PathLike[str]) -> Path:
        if not self.done:
            await self.wait()
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(self.view.model_dump_json(indent=2))
        for name in self.artifacts:
            await self.client._save(_core.artifact(self.id, name), out / _core.local_name(name))
        return out

    async def download_zip(self, path: str | os.PathLike[str]) -> Path:
        if not self.done:
            await self.wait()
        await self.client._save(_core.archive(self.id), Path(path))
        return Path(path)
