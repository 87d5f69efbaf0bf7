"""Reading model directories: ``<models_dir>/<id>/manifest.json`` plus a weights file.

Pure Python (no torch) so that the API lists models without loading them. A model's
version is the sha256 of its weights file: the manifest's ``sha256`` when it states one
(checked by the worker before loading), else computed here and cached by (size, mtime).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from schemas.errors import UnknownModel
from schemas.models import ModelInfo, ModelManifest

MANIFEST = "manifest.json"
_hash_cache: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class ModelEntry:
    manifest: ModelManifest
    directory: Path
    version: str

    @property
    def weights_path(self) -> Path:
        return self.directory / self.manifest.weights

    def info(self) -> ModelInfo:
        m = self.manifest
        return ModelInfo(
            id=m.id,
            description=m.description,
            version=self.version,
            architecture=m.arch_name or m.architecture,
            input_size=m.preprocessing.size,
            input_mode=m.preprocessing.mode,
            preprocessing=m.preprocessing,
            num_classes=len(m.labels),
            labels=m.labels,
            gradcam_layer=m.gradcam_layer,
            layers=m.layers,
            has_training_set=m.training_set is not None,
            metrics=m.metrics,
        )


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _hash_cache[key] = h.hexdigest()
    return _hash_cache[key]


def read_entry(directory: Path) -> ModelEntry:
    """Parse one model directory (raises ``ValueError`` / ``ValidationError`` when broken)."""
    manifest = ModelManifest.model_validate(json.loads((directory / MANIFEST).read_text()))
    weights = directory / manifest.weights
    if not weights.is_file():
        raise ValueError(f"weights file {weights} missing")
    return ModelEntry(manifest, directory, manifest.sha256 or file_sha256(weights))


def scan(models_dir: Path) -> tuple[dict[str, ModelEntry], dict[str, str]]:
    """All valid models under ``models_dir`` by id, and the problems of the broken ones."""
    entries: dict[str, ModelEntry] = {}
    problems: dict[str, str] = {}
    if not models_dir.is_dir():
        return entries, problems
    for d in sorted(p for p in models_dir.iterdir() if (p / MANIFEST).is_file()):
        try:
            entry = read_entry(d)
        except (ValueError, OSError, ValidationError) as e:
            problems[d.name] = str(e)
            continue
        entries[entry.manifest.id] = entry
    return entries, problems


class ModelRegistry:
    """The models directory, re-scanned at most every ``max_age_s`` seconds, so a model
    dropped into it appears without a restart and hot paths do not re-read manifests."""

    def __init__(self, models_dir: Path, max_age_s: float = 3.0) -> None:
        self.models_dir = models_dir
        self.max_age_s = max_age_s
        self._entries: dict[str, ModelEntry] = {}
        self.problems: dict[str, str] = {}
        self._at = -1e9
        self._lock = threading.Lock()

    def entries(self) -> dict[str, ModelEntry]:
        with self._lock:
            if time.monotonic() - self._at > self.max_age_s:
                self._entries, self.problems = scan(self.models_dir)
                self._at = time.monotonic()
            return self._entries

    def get(self, model_id: str) -> ModelEntry:
        entries = self.entries()
        if model_id not in entries:
            raise UnknownModel(f"unknown model {model_id!r}", details={"known": sorted(entries)})
        return entries[model_id]
