"""Uploaded ``.npy`` arrays (``u_analysis``'s ``attribution`` file), checked from their header
before any array exists: the contract the API applies before queueing and the worker again
before use (NumPy only, no torch).

Order of the checks, each a 422 ``bad_params`` naming what is wrong: the magic string and the
header (format 1.0 or 2.0, parsed by NumPy's own reader, never unpickled) -> the dtype (real
numbers only: signed and unsigned integers and floats; no bool, complex, string, object or
structured dtypes) -> the shape against what the job expects -> the byte count of the data
against the shape (a truncated file, or trailing bytes) -> finiteness. The array is a view
of the uploaded bytes; nothing is ever allocated from the size a header declares.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from schemas.errors import BadParams

REAL_KINDS = "iuf"  # numpy dtype kinds: signed int, unsigned int, float


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int  # where the array's bytes start in the file

    @property
    def n_bytes(self) -> int:
        """Bytes the header declares (a Python int: 10**12 floats do not overflow or allocate)."""
        return math.prod(self.shape) * self.dtype.itemsize


def read_header(data: bytes, name: str) -> NpyHeader:
    """Parse the header of the ``.npy`` file ``data`` (upload ``name``, for messages)."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f".npy format version {version[0]}.{version[1]} (1.0 and 2.0 are read)")
    except (ValueError, EOFError, SyntaxError, TypeError, OverflowError) as e:
        raise BadParams(
            f"the {name} upload is not a .npy array: {str(e)[:300]}", details={"upload": name}
        ) from None
    return NpyHeader(tuple(int(s) for s in shape), np.dtype(dtype), bool(fortran), f.tell())


def _check_dtype(dtype: np.dtype, name: str) -> None:
    if dtype.kind not in REAL_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise BadParams(
            f"the {name} upload has dtype {dtype.str!r} ({dtype}); real numbers only (integers or floats)",
            details={"upload": name, "dtype": str(dtype)},
        )


def load_real_array(data: bytes, name: str, header: NpyHeader | None = None) -> np.ndarray:
    """The array of the ``.npy`` file ``data`` (upload ``name``), checked (``header``: when
    already read)."""
    header = header or read_header(data, name)
    dtype = header.dtype
    _check_dtype(dtype, name)
    payload = len(data) - header.data_offset
    if payload != header.n_bytes:
        what = "truncated" if payload < header.n_bytes else "followed by extra bytes"
        raise BadParams(
            f"the {name} upload is {what}: its header declares shape {list(header.shape)} of {dtype} "
            f"({header.n_bytes} bytes), the file holds {payload}",
            details={"upload": name, "declared_bytes": header.n_bytes, "bytes": payload},
        )
    array = np.frombuffer(data, dtype=dtype, count=math.prod(header.shape), offset=header.data_offset)
    array = array.reshape(header.shape, order="F" if header.fortran_order else "C")
    if dtype.kind == "f" and not np.isfinite(array).all():
        raise BadParams(f"the {name} upload has NaN or infinite values", details={"upload": name})
    return array


def attribution_shape(shape: tuple[int, ...], n: int, channels: int, size: tuple[int, int]) -> tuple[int, ...]:
    """``shape`` as ``(N, C', H, W)``: accepted are ``(N, C', H, W)``, ``(N, H, W)``, and for one
    image ``(C', H, W)`` or ``(H, W)``, with ``C'`` 1 or ``channels`` and ``(H, W)`` the
    model's input ``size``. Raises ``BadParams`` naming the expected shapes."""
    if len(shape) == 2 and n == 1:
        full: tuple[int, ...] = (1, 1, *shape)
    elif len(shape) == 3:
        full = (1, *shape) if n == 1 else (shape[0], 1, *shape[1:])
    else:
        full = shape
    if len(full) != 4 or full[0] != n or full[1] not in (1, channels) or tuple(full[2:]) != tuple(size):
        raise BadParams(
            f"attribution map of shape {list(shape)} does not fit {n} image(s) of "
            f"{channels}x{size[0]}x{size[1]}: expected (N, C, H, W), (N, H, W), (C, H, W) or (H, W)",
            details={"upload": "attribution", "shape": list(shape), "expected": [n, channels, *size]},
        )
    return full


def attribution_map(data: bytes, n: int, channels: int, size: tuple[int, int]) -> np.ndarray:
    """The uploaded ``attribution`` map as ``(N, C', H, W)`` float32, every check done (the
    shape on the header, before the data is looked at)."""
    header = read_header(data, "attribution")
    _check_dtype(header.dtype, "attribution")
    full = attribution_shape(header.shape, n, channels, size)
    return load_real_array(data, "attribution", header).reshape(full).astype(np.float32)
