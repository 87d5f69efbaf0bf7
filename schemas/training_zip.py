"""Training sets uploaded as a zip (the ``training_set`` upload of ``influence`` and
``influence_groups``): the structure check both the API and the workers run (stdlib only).

Layout: ImageFolder's, ``<class>/<image>`` (images may sit in subfolders of their class
folder); one top-level folder wrapping the class folders (``train/<class>/<image>``) is
stripped when it holds no image of its own. Images are the members whose names end in
:data:`IMAGE_EXTENSIONS` (any case); other files, directory entries, macOS ``__MACOSX/``
and hidden (``.``) names are ignored. Class folders map to the model's labels by
:func:`class_to_index`, the same mapping as ImageFolder training set directories
(``workers.datasets``); samples come in torchvision's ``make_dataset`` order (classes by
name, then paths sorted), so a zip and the directory it was made from give the same set.

Refused, before anything is queued (and again by the worker, with this code): not a zip,
an encrypted member or one compressed other than stored/deflate/bzip2/lzma, absolute paths,
drive letters, backslashes or ``..`` in a member name, a name twice (422); more images than
``max_training_set_images`` or more members than twice that plus :data:`SPARE_MEMBERS`, a
declared uncompressed size over ``max_training_set_uncompressed_bytes`` (413: zip bombs); no
class folders, no images, class folders that match the labels neither by name nor by count
(422). The worker reads each member with :func:`read_member`: inflated 64 KiB at a time and
stopped as soon as it passes its declared size, so a member that declares 100 bytes and
inflates to 512 MiB is refused (422) having cost 64 KiB, not the 512 MiB (``zipfile``'s own
``read`` inflates a whole deflate stream before it cuts it to the declared size).
"""

from __future__ import annotations

import bz2
import io
import lzma
import posixpath
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from schemas.errors import BadParams, PayloadTooLarge

UPLOAD_NAME = "training_set"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
"""torchvision's ImageFolder extensions that the service decodes (``.ppm``/``.pgm`` are not)."""
COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
SPARE_MEMBERS = 1024
"""Members allowed besides images (directory entries, stray files) on top of the image limit."""
CHUNK = 1 << 16
"""Bytes a member is inflated by at a time (:func:`read_member`)."""


def class_to_index(classes: list[str], labels: list[str]) -> dict[str, int] | None:
    """Label index of each class folder: a folder named like one of ``labels`` gets that
    label's index; otherwise, when there are as many folders as labels, folders map to labels
    in sorted order (torchvision's convention). None when neither applies."""
    if classes and all(c in labels for c in classes):
        return {c: labels.index(c) for c in classes}
    if classes and len(classes) == len(labels):
        return {c: i for i, c in enumerate(sorted(classes))}
    return None


def mapping_error(classes: list[str], labels: list[str]) -> str:
    return (
        f"{len(classes)} class folders, which match the model's labels neither by name nor by count "
        f"({len(labels)})"
    )


@dataclass(frozen=True)
class ZipTrainingSet:
    """A checked zip: image ``members`` (zip names, in sample order) and their ``labels``."""

    members: list[str]
    labels: list[int]
    classes: dict[str, int]
    uncompressed_bytes: int


def _bad_name(name: str) -> bool:
    parts = name.split("/")
    return (
        name.startswith("/")
        or "\\" in name
        or (len(name) > 1 and name[1] == ":")
        or any(p == ".." for p in parts)
    )


def _ignored(parts: list[str]) -> bool:
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def open_zip(data: bytes | str | Path | IO[bytes], what: str = UPLOAD_NAME) -> list[zipfile.ZipInfo]:
    """The central directory of an uploaded zip (bytes, a path or a binary file); 422 when it
    is not a readable zip."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else data)
    except Exception as e:  # BadZipFile, and whatever a mangled central directory raises
        raise BadParams(f"the {what} upload is not a readable zip file: {e}") from None
    with archive:
        return archive.infolist()


def check_members(
    infos: list[zipfile.ZipInfo], max_images: int, max_uncompressed_bytes: int, what: str = UPLOAD_NAME
) -> tuple[list[list[str]], int]:
    """Check every member's name, encryption, compression and the declared total size;
    returns the path parts of the files that count (not ignored) and the total size."""
    max_members = 2 * max_images + SPARE_MEMBERS
    if len(infos) > max_members:
        raise PayloadTooLarge(
            f"the {what} zip has {len(infos)} members; the limit is {max_members}",
            details={"limit": max_members},
        )
    total = 0
    files: list[list[str]] = []
    for info in infos:
        name = info.filename
        if _bad_name(name):
            raise BadParams(
                f"{what} zip member {name!r} has an absolute path, a backslash or '..'",
                details={"member": name},
            )
        if info.flag_bits & 0x1:
            raise BadParams(f"{what} zip member {name!r} is encrypted", details={"member": name})
        if info.compress_type not in COMPRESSIONS:
            raise BadParams(
                f"{what} zip member {name!r} uses compression method {info.compress_type}; "
                "use stored, deflate, bzip2 or lzma",
                details={"member": name},
            )
        total += info.file_size
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if not info.is_dir() and parts and not _ignored(parts):
            files.append(parts)
    if total > max_uncompressed_bytes:
        raise PayloadTooLarge(
            f"the {what} zip holds {total} bytes uncompressed; the limit is {max_uncompressed_bytes}",
            details={"limit": max_uncompressed_bytes},
        )
    return files, total


def class_prefix(files: list[list[str]]) -> int:
    """1 when one top-level folder wraps everything and holds no image of its own (a wrapper,
    not a class), else 0."""
    images = [p for p in files if p[-1].lower().endswith(IMAGE_EXTENSIONS)]
    tops = {p[0] for p in files}
    return int(len(tops) == 1 and all(len(p) >= 3 for p in images) and any(len(p) > 1 for p in files))


def imagefolder_order(in_classes: list[list[str]], prefix: int) -> list[list[str]]:
    """torchvision's make_dataset order: class folders by name, then directories, then files."""
    return [r[3] for r in sorted((p[prefix], posixpath.join(*p[prefix:-1]), p[-1], p) for p in in_classes)]


def check_training_zip(
    data: bytes | str | Path | IO[bytes], labels: list[str], max_images: int, max_uncompressed_bytes: int
) -> ZipTrainingSet:
    """Check an uploaded training set zip against the model's ``labels`` and the limits;
    raises ``BadParams`` (422) or ``PayloadTooLarge`` (413). Reads the central directory
    only: no member is decompressed."""
    infos = open_zip(data)
    files, total = check_members(infos, max_images, max_uncompressed_bytes)
    images = [p for p in files if p[-1].lower().endswith(IMAGE_EXTENSIONS)]
    prefix = class_prefix(files)
    in_classes = [p for p in images if len(p) - prefix >= 2]
    classes = sorted({p[prefix] for p in files if len(p) - prefix >= 2})
    if not classes:
        raise BadParams(
            "the training_set zip has no class folders: lay it out as <class>/<image> (ImageFolder)",
            details={"labels": labels},
        )
    mapping = class_to_index(classes, labels)
    if mapping is None:
        raise BadParams(
            f"the training_set zip has {mapping_error(classes, labels)}",
            details={"classes": classes[:100], "labels": labels[:100]},
        )
    if not in_classes:
        raise BadParams(
            f"the training_set zip holds no images in its class folders ({', '.join(IMAGE_EXTENSIONS)})"
        )
    if len(in_classes) > max_images:
        raise PayloadTooLarge(
            f"the training_set zip holds {len(in_classes)} images; the limit is {max_images}",
            details={"limit": max_images},
        )
    ordered = imagefolder_order(in_classes, prefix)
    members = member_names(infos, {"/".join(p) for p in in_classes})
    return ZipTrainingSet(
        members=[members["/".join(p)] for p in ordered],
        labels=[mapping[p[prefix]] for p in ordered],
        classes=mapping,
        uncompressed_bytes=total,
    )


def member_names(infos: list[zipfile.ZipInfo], wanted: set[str], what: str = UPLOAD_NAME) -> dict[str, str]:
    """Normalised name (``a/./b`` -> ``a/b``) -> the member's name in the zip."""
    out: dict[str, str] = {}
    for info in infos:
        key = "/".join(p for p in info.filename.split("/") if p not in ("", "."))
        if key in wanted:
            if key in out:
                raise BadParams(f"{what} zip has member {key!r} twice", details={"member": key})
            out[key] = info.filename
    return out


LOCAL_HEADER = b"PK\x03\x04"
LOCAL_HEADER_SIZE = 30
"""A local file header: signature, 26 bytes of fields (name and extra field lengths at offset
26 and 28), then the name and the extra field (APPNOTE 4.3.7)."""


def _member_data(archive: bytes, info: zipfile.ZipInfo) -> memoryview:
    """The compressed bytes of ``info`` in ``archive`` (after its local file header)."""
    at = info.header_offset
    header = archive[at : at + LOCAL_HEADER_SIZE]
    if len(header) != LOCAL_HEADER_SIZE or header[:4] != LOCAL_HEADER:
        raise BadParams(
            f"training_set zip member {info.filename!r} has no local header", details={"member": info.filename}
        )
    name_length, extra_length = struct.unpack_from("<HH", header, 26)
    start = at + LOCAL_HEADER_SIZE + name_length + extra_length
    return memoryview(archive)[start : start + info.compress_size]


def _decompressor(info: zipfile.ZipInfo, raw: memoryview) -> tuple[object, memoryview]:
    """A decompressor taking ``max_length`` for the member, and its compressed stream."""
    if info.compress_type == zipfile.ZIP_DEFLATED:
        return zlib.decompressobj(-15), raw
    if info.compress_type == zipfile.ZIP_BZIP2:
        return bz2.BZ2Decompressor(), raw
    # ZIP_LZMA: a 4-byte header (version, size of the properties), the LZMA1 properties, then
    # a raw stream (APPNOTE 5.8.8; as zipfile.LZMADecompressor reads it).
    (size,) = struct.unpack("<H", raw[2:4])
    filters = [lzma._decode_filter_properties(lzma.FILTER_LZMA1, bytes(raw[4 : 4 + size]))]  # type: ignore[attr-defined]
    return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=filters), raw[4 + size :]


def _inflated(info: zipfile.ZipInfo, raw: memoryview) -> Iterator[bytes | memoryview]:
    """The member's bytes, at most :data:`CHUNK` at a time (no check of the total here)."""
    if info.compress_type == zipfile.ZIP_STORED:
        for i in range(0, min(len(raw), info.file_size + 1), CHUNK):
            yield raw[i : min(i + CHUNK, info.file_size + 1)]
        return
    decomp, raw = _decompressor(info, raw)
    for i in range(0, len(raw), CHUNK):
        data: bytes | memoryview = raw[i : i + CHUNK]
        while True:
            yield decomp.decompress(data, CHUNK)  # type: ignore[attr-defined]
            if getattr(decomp, "eof", False):
                return
            data = getattr(decomp, "unconsumed_tail", b"")  # zlib keeps what it did not inflate
            if not data and getattr(decomp, "needs_input", True):
                break
    if hasattr(decomp, "flush"):  # zlib: what it holds back of a stream cut short
        yield decomp.flush(CHUNK)


def iter_member(archive: bytes, info: zipfile.ZipInfo) -> Iterator[bytes | memoryview]:
    """The bytes of member ``info`` of the zip ``archive`` (its ``ZipInfo`` from the central
    directory), streamed: at most :data:`CHUNK` bytes are inflated at a time, and reading stops
    as soon as the output passes the declared ``file_size`` (422), so memory stays within
    what the caller keeps plus one chunk, whatever the member inflates to. A CRC or length
    that does not match is a 422 at the end. A caller may stop early (e.g. once an image's
    header shows too many pixels)."""
    name = info.filename
    total, crc = 0, 0
    try:
        for piece in _inflated(info, _member_data(archive, info)):
            total += len(piece)
            if total > info.file_size:
                raise BadParams(
                    f"training_set zip member {name!r} inflates past its declared size of "
                    f"{info.file_size} bytes (a zip bomb?)",
                    details={"member": name, "declared_bytes": info.file_size},
                )
            crc = zlib.crc32(piece, crc)
            yield piece
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError, struct.error) as e:
        raise BadParams(f"training_set zip member {name!r} is corrupt: {e}", details={"member": name}) from None
    if total != info.file_size or crc != info.CRC:
        raise BadParams(
            f"training_set zip member {name!r} is corrupt: {total} bytes where it declares {info.file_size}, "
            "or a CRC that does not match",
            details={"member": name},
        )


def read_member(archive: bytes, info: zipfile.ZipInfo) -> bytes:
    """The whole member, through :func:`iter_member`."""
    return b"".join(iter_member(archive, info))
