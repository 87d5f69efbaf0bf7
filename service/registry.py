"""The API's view of the models directory: manifests re-read at most every few seconds,
so a model dropped into the directory appears without a restart."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from schemas.errors import UnknownModel
from schemas.manifests import ModelEntry, scan


class ModelRegistry:
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
