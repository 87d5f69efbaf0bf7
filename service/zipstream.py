"""A zip written while it is sent: ``zip_stream(entries)`` yields the bytes of a stored
(uncompressed) ZIP64 archive of in-memory data and files, reading files a block at a time."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

BLOCK = 1 << 20


class _Buffer:
    """The unseekable file ``zipfile`` writes into; ``take()`` hands over what it holds."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.written = 0

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        self.written += len(data)
        return len(data)

    def tell(self) -> int:
        return self.written

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts = []
        return out


def zip_stream(entries: list[tuple[str, bytes | Path]]) -> Iterator[bytes]:
    """The archive's bytes, a block at a time; memory holds about one block."""
    buf = _Buffer()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:  # type: ignore[call-overload]
        for name, source in entries:
            with zf.open(name, "w", force_zip64=isinstance(source, Path)) as out:
                if isinstance(source, Path):
                    with source.open("rb") as f:
                        while block := f.read(BLOCK):
                            out.write(block)
                            yield buf.take()
                else:
                    out.write(source)
            yield buf.take()
    yield buf.take()
