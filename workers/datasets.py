"""Registered training sets as tensors, for influence functions and dataset-level sweeps.

A model's manifest names its training set (``ModelManifest.training_set``):

- ``{"kind": "builtin", "name": "sklearn-digits"}``: the training split of scikit-learn's
  digits, fixed by ``workers.models.digits.load_split()`` (1,437 images ``(1, 8, 8)`` in
  [0, 1], the scale ``digits-cnn`` was trained on).
- ``{"kind": "imagefolder", "path": "train"}``: a torchvision ``ImageFolder`` directory
  (``<path>/<class>/<image>``) relative to the model directory, preprocessed exactly like
  the model's inputs (``workers.registry.preprocess``). A folder named like one of the
  manifest's labels gets that label's index; otherwise, when there are as many folders as
  labels, folders map to labels in sorted order (torchvision's convention; the mapping is
  ``schemas.training_zip.class_to_index``).
- Uploaded with the job: the ``training_set`` file of ``influence`` and ``influence_groups``,
  a zip in the same ImageFolder layout (``<class>/<image>``, optionally inside one top-level
  folder) with the same folder -> label mapping, checked by the API and again here with the
  same code and limits (``schemas.training_zip.check_training_zip``), read in memory (never
  extracted) and preprocessed like the model's inputs (:func:`uploaded_training_set`). It
  wins over the registered set; its fingerprint hashes the zip's bytes.

Each set has a ``fingerprint`` (sha256 of its contents, or of file names, sizes and
modification times for folders) so caches keyed on it are invalidated when the data change.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from schemas.errors import BadParams, JobFailure, PayloadTooLarge
from schemas.models import ModelManifest, Preprocessing
from schemas.stored_images import UPLOAD_FORMATS
from schemas.training_zip import check_training_zip, class_to_index, iter_member, mapping_error

MAX_IN_MEMORY_BYTES = 1 << 30
"""Folders whose preprocessed tensors exceed this are read from disk batch by batch."""


@dataclass
class TrainingSetData:
    """``n`` labelled training images, preprocessed for one model.

    labels:      ``(n,)`` int64 class indices into the manifest's labels.
    fingerprint: content hash; identifies the set in caches.
    source:      human-readable origin (``builtin:sklearn-digits``, ``imagefolder:/path``).
    tensor:      ``(n, C, H, W)`` float32 normalised images when held in memory, else None.
    paths:       image files (ImageFolder sets read lazily), else None.
    archive:     the zip of an uploaded set, with its image ``members`` (read lazily when
                 ``tensor`` is None), else None.
    """

    labels: np.ndarray
    fingerprint: str
    source: str
    tensor: torch.Tensor | None = None
    paths: list[Path] | None = None
    archive: bytes | None = field(default=None, repr=False)
    members: list[str] | None = None
    preprocessing: Preprocessing | None = None
    _display: np.ndarray | None = field(default=None, repr=False)  # (n, H, W, 3) uint8

    @classmethod
    def from_tensors(
        cls, images: torch.Tensor, labels: torch.Tensor | np.ndarray, source: str = "tensors",
        display: np.ndarray | None = None,
    ) -> TrainingSetData:
        """A set held in memory: ``images (n, C, H, W)`` float, ``labels (n,)``; ``display``
        ``(n, H, W, 3)`` uint8 (default: the images min-max scaled to grey or RGB)."""
        x = images.detach().cpu().contiguous()
        y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
        h = hashlib.sha256(source.encode())
        h.update(x.numpy().tobytes())
        h.update(y.tobytes())
        if display is None and x.ndim == 4 and x.shape[1] in (1, 3):
            a = x.numpy().transpose(0, 2, 3, 1)
            lo, hi = float(a.min()), float(a.max())
            a = np.round((a - lo) / (hi - lo if hi > lo else 1.0) * 255).astype(np.uint8)
            display = np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a
        return cls(labels=y, fingerprint=h.hexdigest(), source=source, tensor=x, _display=display)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def images(self, index: np.ndarray | slice) -> torch.Tensor:
        """Images ``(b, C, H, W)`` float32 (CPU) at ``index`` (a slice or an int array)."""
        if self.tensor is not None:
            if isinstance(index, slice):
                return self.tensor[index]
            return self.tensor[torch.as_tensor(np.asarray(index), dtype=torch.long)]
        assert self.preprocessing is not None
        idx = np.arange(len(self))[index]
        if self.archive is not None and self.members is not None:
            x, _ = _read_zip_images(self.archive, [self.members[i] for i in idx], self.preprocessing)
            return x
        assert self.paths is not None
        x, _ = _read_images([self.paths[i] for i in idx], self.preprocessing)
        return x

    def batches(self, size: int, index: np.ndarray | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(start, images (b, C, H, W), labels (b,))`` chunks over ``index`` (default: all)."""
        idx = np.arange(len(self)) if index is None else np.asarray(index)
        labels = torch.from_numpy(self.labels)
        for start in range(0, len(idx), size):
            part = idx[start : start + size]
            if index is None:
                sl = slice(int(part[0]), int(part[-1]) + 1)
                yield start, self.images(sl), labels[sl]
            else:
                yield start, self.images(part), labels[torch.from_numpy(part)]

    def display(self, i: int) -> np.ndarray:
        """Training image ``i`` as shown to a person: ``(H, W, 3)`` uint8."""
        if self._display is not None:
            return self._display[i]
        if self.archive is not None and self.members is not None and self.preprocessing is not None:
            return _read_zip_images(self.archive, [self.members[i]], self.preprocessing)[1][0]
        if self.paths is None or self.preprocessing is None:  # not an image set: a grey tile
            return np.full((8, 8, 3), 128, dtype=np.uint8)
        _, disp = _read_images([self.paths[i]], self.preprocessing)
        return disp[0]


def _read_images(paths: list[Path], pre: Preprocessing) -> tuple[torch.Tensor, list[np.ndarray]]:
    from PIL import UnidentifiedImageError

    from workers.registry import preprocess

    images = []
    for p in paths:
        try:
            with Image.open(p) as img:
                img.load()
                images.append(img.copy())
        except (OSError, UnidentifiedImageError) as e:
            raise JobFailure(f"training image {p} cannot be read: {e}", type="bad_training_set") from e
    return preprocess(images, pre)


def _digits() -> TrainingSetData:
    from workers.models.digits import load_split

    x, y, _, _ = load_split()
    h = hashlib.sha256(b"sklearn-digits")
    h.update(np.ascontiguousarray(x).tobytes())
    h.update(np.ascontiguousarray(y).tobytes())
    grey = np.round(x * 255).astype(np.uint8)
    return TrainingSetData(
        labels=y.astype(np.int64),
        fingerprint=h.hexdigest(),
        source="builtin:sklearn-digits",
        tensor=torch.from_numpy(x)[:, None].contiguous(),
        _display=np.repeat(grey[..., None], 3, axis=-1),
    )


BUILTIN = {"sklearn-digits": _digits}


def _list_folder(root: Path, manifest: ModelManifest) -> tuple[list[Path], np.ndarray, str]:
    """Image files, their label indices and the folder's fingerprint (no image is read)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not root.is_dir():
        raise JobFailure(f"training set folder {root} of model {manifest.id!r} is missing", type="bad_training_set")
    try:
        classes, _ = find_classes(str(root))
    except FileNotFoundError as e:
        raise JobFailure(f"training set folder {root} has no class folders", type="bad_training_set") from e
    class_to_idx = class_to_index(classes, manifest.labels)
    if class_to_idx is None:
        raise JobFailure(
            f"training set folder {root} has {mapping_error(classes, manifest.labels)}", type="bad_training_set"
        )
    samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
    if not samples:
        raise JobFailure(f"training set folder {root} holds no images", type="bad_training_set")
    paths = [Path(p) for p, _ in samples]
    labels = np.array([c for _, c in samples], dtype=np.int64)
    h = hashlib.sha256(manifest.preprocessing.model_dump_json().encode())
    for p, c in zip(paths, labels, strict=True):
        st = p.stat()
        h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\0{c}\n".encode())
    return paths, labels, h.hexdigest()


def _image_folder(root: Path, manifest: ModelManifest) -> TrainingSetData:
    paths, labels, fingerprint = _list_folder(root, manifest)
    data = TrainingSetData(
        labels=labels,
        fingerprint=fingerprint,
        source=f"imagefolder:{root}",
        paths=paths,
        preprocessing=manifest.preprocessing,
    )
    c = 1 if manifest.preprocessing.mode == "L" else 3
    hh, ww = manifest.preprocessing.size
    if len(paths) * c * hh * ww * 4 <= MAX_IN_MEMORY_BYTES:
        x, disp = _read_images(paths, manifest.preprocessing)
        data.tensor, data._display = x, np.stack(disp)
    return data


HEADER_BYTES = 1 << 16
"""How much of a zip member is read before its image header is looked at (PNG's IHDR, a
JPEG's frame header after its EXIF and colour profile, GIF's and BMP's headers)."""


def _check_pixels(img: Image.Image, name: str, max_pixels: int) -> None:
    if img.width * img.height > max_pixels:
        raise PayloadTooLarge(
            f"training_set image {name!r} has {img.width * img.height} pixels; the limit is {max_pixels}",
            details={"member": name, "limit": max_pixels},
        )


def _pieces(
    archive: bytes | Path, info: zipfile.ZipInfo, zf: zipfile.ZipFile | None
) -> Iterator[bytes | memoryview]:
    """Member ``info`` streamed: from bytes by ``schemas.training_zip.iter_member`` (stopped past
    its declared size); from a stored data set's file (checked by the API when it was uploaded)
    by zipfile's own reader, which also stops at the declared size and checks the CRC."""
    if isinstance(archive, bytes):
        yield from iter_member(archive, info)
        return
    assert zf is not None, "a stored zip is read through its open ZipFile"
    with zf.open(info) as f:
        while piece := f.read(HEADER_BYTES):
            yield piece


def _member_bytes(
    archive: bytes | Path, info: zipfile.ZipInfo, max_pixels: int, zf: zipfile.ZipFile | None = None
) -> bytes:
    """A zip member, streamed (:func:`_pieces`); once its first :data:`HEADER_BYTES` are in, the
    image header they hold is checked against ``max_pixels``, so an image over the limit is
    refused before the rest is read."""
    buf, looked = bytearray(), False
    for piece in _pieces(archive, info, zf):
        buf += piece
        if not looked and len(buf) >= HEADER_BYTES:
            looked = True
            try:
                head = Image.open(io.BytesIO(buf), formats=UPLOAD_FORMATS)
            except (OSError, ValueError, SyntaxError, EOFError):  # header not within the head: checked after
                continue
            with head:
                _check_pixels(head, info.filename, max_pixels)
    return bytes(buf)


def _read_zip_images(
    archive: bytes | Path, members: list[str], pre: Preprocessing, max_pixels: int | None = None
) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Decode zip ``members`` in memory (nothing is extracted to disk) with the formats the API
    decodes, each checked against ``max_pixels`` (default: the settings') before decoding."""
    import warnings

    from PIL import ImageOps, UnidentifiedImageError

    from schemas.stored_images import to_rgb
    from workers.registry import preprocess

    if max_pixels is None:
        from schemas.settings import get_settings

        max_pixels = get_settings().max_image_pixels
    images = []
    with zipfile.ZipFile(io.BytesIO(archive) if isinstance(archive, bytes) else archive) as zf:
        for name in members:
            try:
                data = _member_bytes(archive, zf.getinfo(name), max_pixels, zf)
                with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as img:
                    _check_pixels(img, name, max_pixels)
                    with warnings.catch_warnings():
                        warnings.simplefilter("error", Image.DecompressionBombWarning)
                        img.load()
                    images.append(to_rgb(ImageOps.exif_transpose(img)))  # as the API stores uploads
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError, NotImplementedError,
                    zipfile.BadZipFile, Image.DecompressionBombWarning) as e:
                raise BadParams(
                    f"training_set image {name!r} cannot be read: {e}", details={"member": name}
                ) from None
    return preprocess(images, pre)


def uploaded_training_set(archive: bytes, manifest: ModelManifest) -> TrainingSetData:
    """A training set uploaded as a zip (``schemas.training_zip``), checked again with the
    API's code and limits, decoded in memory and preprocessed like the model's inputs.
    Fingerprint: sha256 of the zip bytes with the preprocessing and labels (which decide the
    tensors and the label mapping), so gradient caches are reused for the same upload."""
    from schemas.settings import get_settings

    settings = get_settings()
    checked = check_training_zip(
        archive, manifest.labels, settings.max_training_set_images, settings.max_training_set_uncompressed_bytes
    )
    archive_sha = hashlib.sha256(archive)
    h = hashlib.sha256(b"zip\0")
    h.update(manifest.preprocessing.model_dump_json().encode())
    h.update(json.dumps(checked.classes, sort_keys=True).encode())
    h.update(archive_sha.digest())
    key = h.hexdigest()
    with _lock:
        cached = _uploads.get(key)
        if cached is not None:
            _uploads.move_to_end(key)
            return cached
    data = TrainingSetData(
        labels=np.asarray(checked.labels, dtype=np.int64),
        fingerprint=key,
        source=f"upload:training_set.zip (sha256 {archive_sha.hexdigest()[:16]})",
        archive=archive,
        members=checked.members,
        preprocessing=manifest.preprocessing,
    )
    c = 1 if manifest.preprocessing.mode == "L" else 3
    hh, ww = manifest.preprocessing.size
    if len(checked.members) * c * hh * ww * 4 <= MAX_IN_MEMORY_BYTES:
        x, disp = _read_zip_images(archive, checked.members, manifest.preprocessing, settings.max_image_pixels)
        data.tensor, data._display = x, np.stack(disp)
    else:  # read batch by batch; still decode every image once now, to fail early
        for start in range(0, len(checked.members), 256):
            _read_zip_images(archive, checked.members[start : start + 256], manifest.preprocessing)
    with _lock:
        _uploads[key] = data
        while len(_uploads) > MAX_CACHED_UPLOADS:
            _uploads.popitem(last=False)
    return data


_cache: dict[str, TrainingSetData] = {}
_uploads: OrderedDict[str, TrainingSetData] = OrderedDict()
MAX_CACHED_UPLOADS = 2
_lock = threading.Lock()


def load_training_set(manifest: ModelManifest, model_dir: Path | None) -> TrainingSetData:
    """The training set registered in ``manifest``, preprocessed for the model (cached per
    process while its fingerprint is unchanged).

    ``model_dir`` is the model's directory (ImageFolder paths are relative to it); built-in
    sets do not need it. A model without a training set -> ``BadParams``.
    """
    ts = manifest.training_set
    if ts is None:
        raise BadParams(
            f"model {manifest.id!r} has no training set registered; influence functions need one "
            "(add 'training_set' to its manifest: an ImageFolder directory or a built-in set)",
            details={"model_id": manifest.id},
        )
    if ts.kind == "builtin":
        if ts.name not in BUILTIN:
            raise JobFailure(
                f"model {manifest.id!r} names an unknown built-in training set {ts.name!r}",
                type="bad_training_set",
                details={"known": sorted(BUILTIN)},
            )
        key = f"builtin:{ts.name}"
        with _lock:
            if key not in _cache:
                _cache[key] = BUILTIN[ts.name]()
            return _cache[key]
    if model_dir is None or not ts.path:
        raise JobFailure(
            f"model {manifest.id!r}: an ImageFolder training set needs its path and the model directory",
            type="bad_training_set",
        )
    root = (model_dir / ts.path).resolve()
    key = json.dumps([str(root), manifest.preprocessing.model_dump(mode="json"), manifest.labels])
    with _lock:
        cached = _cache.get(key)
        # Re-list the folder every time (cheap): a changed file changes the fingerprint.
        if cached is None or _list_folder(root, manifest)[2] != cached.fingerprint:
            _cache[key] = _image_folder(root, manifest)
        return _cache[key]
