"""Warm-up pieces on their own: which models to warm, the model cache's budget and timings,
the engine cache's invalidation, and giving freed memory back (workers.warmup,
workers.registry.ModelCache, workers.engine, workers.allocator)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers.allocator import ALLOCATOR_ENV
from workers.warmup import warm_targets


def test_warm_targets_all_none_and_lists() -> None:
    available = ["digits-cnn", "efficientnet-lite0"]
    assert warm_targets("all", available) == ["digits-cnn", "efficientnet-lite0"]
    assert warm_targets("none", available) == []
    assert warm_targets(" efficientnet-lite0 , later ", available) == ["efficientnet-lite0", "later"]
    assert warm_targets("none", available, preload=["digits-cnn"]) == ["digits-cnn"]
    assert warm_targets("digits-cnn", available, preload=["digits-cnn"]) == ["digits-cnn"]  # once


def test_cache_loads_once_warm_reports_zero_and_the_budget_drops_the_least_recently_used(models_dir: Path) -> None:
    from tests.conftest import TEST_CACHE_DIR
    from workers.registry import ModelCache

    # Eager engines (no export): resnet18-random holds 11.2M parameters = 42.7 MiB.
    cache = ModelCache(models_dir, TEST_CACHE_DIR, device="cpu", onnx=False, memory_mb=40)
    digits, cold = cache.get_timed("digits-cnn")
    assert cold > 0
    assert cache.get_timed("digits-cnn") == (digits, 0.0)  # warm: the same object, no wait
    cache.get("resnet18-random")
    assert set(cache.loaded()) == {"resnet18-random"}, "over 40 MiB: digits-cnn, used least recently, goes"
    again, cold = cache.get_timed("digits-cnn")
    assert cold > 0 and again is not digits
    assert set(cache.loaded()) == {"digits-cnn"}, "resnet18-random alone is over the budget: it goes"

    unlimited = ModelCache(models_dir, TEST_CACHE_DIR, device="cpu", onnx=False)
    unlimited.get("digits-cnn")
    unlimited.get("resnet18-random")
    assert set(unlimited.loaded()) == {"digits-cnn", "resnet18-random"}


def test_engine_cache_entry_changes_with_the_library_versions(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.engine as engine
    from schemas.manifests import ModelRegistry
    from workers.registry import build_module

    entry = ModelRegistry(models_dir).get("digits-cnn")
    module = build_module(entry)
    cpu = torch.device("cpu")
    first = engine.build_engine(module, entry, tmp_path, cpu, budget_s=0.5)
    assert first.name == "onnxruntime" and first.measure_s > 0
    again = engine.build_engine(module, entry, tmp_path, cpu, budget_s=0.5)
    assert again.measure_s == 0.0 and again.batch_size == first.batch_size, "a second start reuses the entry"
    files = sorted(p.name for p in (tmp_path / "onnx").glob("*.json"))
    assert files == [f"digits-cnn-{entry.version}-{engine.library_key()}.json"]

    monkeypatch.setattr(engine, "library_key", lambda: "0123456789")  # as after an upgrade of torch
    upgraded = engine.build_engine(module, entry, tmp_path, cpu, budget_s=0.5)
    assert upgraded.measure_s > 0, "another library version measures (and exports) again"
    meta = json.loads((tmp_path / "onnx" / f"digits-cnn-{entry.version}-0123456789.json").read_text())
    assert meta["exporter"] == "torchscript" and meta["version"] == entry.version
    assert (tmp_path / "onnx" / f"digits-cnn-{entry.version}-0123456789.onnx").exists()


def test_release_free_memory_returns_a_jobs_activations_under_the_worker_allocator_settings() -> None:
    """Under ALLOCATOR_ENV glibc keeps 1 GiB of freed heap; the worker's call after each job
    gives it back (the worker's RSS returns to near idle)."""
    script = """
import torch
from workers.allocator import release_free_memory
from workers.budget import rss_mb
idle = rss_mb()
blocks = [torch.ones(16, 1024, 1024) for _ in range(4)]  # 256 MiB in 64 MiB blocks, touched
peak = rss_mb()
del blocks
kept = rss_mb()
released = release_free_memory()
print(idle, peak, kept, rss_mb(), released)
"""
    env = {**os.environ, **ALLOCATOR_ENV}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    idle, peak, kept, after, released = out.stdout.split()
    idle, peak, kept, after = float(idle), float(peak), float(kept), float(after)
    assert peak - idle > 240
    assert kept - idle > 200, "the allocator settings keep freed blocks (the reason for the call)"
    assert released == "True" and after - idle < 0.2 * (peak - idle)
