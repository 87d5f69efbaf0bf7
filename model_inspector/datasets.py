"""``client.datasets``: upload a folder or a zip once, then name it in jobs (``dataset=``).

The contract (layouts, ids, quotas) is ``schemas.datasets``: an ImageFolder ``<class>/<image>``
tree, or flat images with an optional ``labels.csv``. A folder is zipped by the client (on
disk past 64 MiB, never whole in memory); the same bytes uploaded again give the same id.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from model_inspector._core import Call, seg
from model_inspector.inputs import zip_folder
from schemas.datasets import UPLOAD_FIELD, DatasetDetail, DatasetInfo, DatasetList

if TYPE_CHECKING:
    from model_inspector.aio import AsyncClient
    from model_inspector.client import Client

PathLike = str | os.PathLike[str]


def upload(path: PathLike, name: str | None = None) -> tuple[Call[DatasetInfo], BinaryIO]:
    """The upload call and the open file it streams (the caller closes it)."""
    p = Path(path)
    body: BinaryIO = zip_folder(p) if p.is_dir() else open(p, "rb")  # noqa: SIM115 (closed by the caller)
    filename = f"{p.name}.zip" if p.is_dir() else p.name
    call = Call(
        "POST",
        "/v1/datasets",
        lambda r: DatasetInfo.model_validate_json(r.content),
        params={"name": name or p.name},
        files=[(UPLOAD_FIELD, (filename, body, "application/zip"))],
        final=("quota_exceeded",),  # the tenant's storage is full: waiting does not free it
    )
    return call, body


def list_() -> Call[list[DatasetInfo]]:
    return Call("GET", "/v1/datasets", lambda r: DatasetList.model_validate_json(r.content).datasets)


def get(dataset_id: str) -> Call[DatasetDetail]:
    return Call("GET", f"/v1/datasets/{seg(dataset_id)}", lambda r: DatasetDetail.model_validate_json(r.content))


def delete(dataset_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/datasets/{seg(dataset_id)}", lambda r: None)


class Datasets:
    """``client.datasets`` of a :class:`~model_inspector.Client`."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def upload(self, path: PathLike, name: str | None = None) -> DatasetInfo:
        """Upload a zip, or a folder (zipped here); ``name`` defaults to the file's."""
        call, body = upload(path, name)
        with body:
            return self.client.send(call)

    def list(self) -> list[DatasetInfo]:
        """The tenant's data sets and the models' registered ones (read-only)."""
        return self.client.send(list_())

    def get(self, dataset_id: str) -> DatasetDetail:
        return self.client.send(get(dataset_id))

    def delete(self, dataset_id: str) -> None:
        """Raises :class:`~model_inspector.errors.DatasetInUse` while a job still reads it."""
        self.client.send(delete(dataset_id))


class AsyncDatasets:
    """``client.datasets`` of an :class:`~model_inspector.AsyncClient`."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    async def upload(self, path: PathLike, name: str | None = None) -> DatasetInfo:
        call, body = upload(path, name)
        with body:
            return await self.client.send(call)

    async def list(self) -> list[DatasetInfo]:
        return await self.client.send(list_())

    async def get(self, dataset_id: str) -> DatasetDetail:
        return await self.client.send(get(dataset_id))

    async def delete(self, dataset_id: str) -> None:
        await self.client.send(delete(dataset_id))
