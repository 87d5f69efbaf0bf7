"""The forward engine: ONNX Runtime equals eager, falls back to eager, caches its work on disk."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from schemas.manifests import ModelEntry, file_sha256, read_entry
from schemas.models import ModelManifest, Preprocessing
from workers import engine as engine_mod
from workers.engine import (
    ALLOCATOR_ENV,
    CPU_CANDIDATES,
    CPU_GRAD_CANDIDATES,
    TOLERANCE,
    EngineUnavailable,
    build_engine,
    check_against_eager,
    eager_forward,
    library_key,
    pick_batch_size,
    probe_batch,
)
from workers.registry import build_module

CPU = torch.device("cpu")
BUDGET_S = 1.0  # per batch-size measurement: keeps the tests fast, still picks a real size


def _entry(tmp_path: Path, model_id: str, size: tuple[int, int] = (8, 8), classes: int = 10) -> ModelEntry:
    """A manifest for a model built in the test (1-channel input of ``size``)."""
    manifest = ModelManifest(
        id=model_id,
        architecture="torchscript",
        weights="unused.pt",
        preprocessing=Preprocessing(size=size, mode="L", mean=[0.0], std=[1.0]),
        labels=[str(i) for i in range(classes)],
    )
    return ModelEntry(manifest, tmp_path, version=f"{model_id}-test-version")


@pytest.fixture
def export_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the exporter of every real ``export_onnx`` call."""
    calls: list[str] = []
    real = engine_mod.export_onnx

    def counting(module: nn.Module, example: torch.Tensor, path: Path, exporter: str) -> None:
        calls.append(exporter)
        real(module, example, path, exporter)

    monkeypatch.setattr(engine_mod, "export_onnx", counting)
    return calls


@pytest.mark.parametrize("model_id", ["digits-cnn", "resnet18-random"])
def test_onnx_engine_matches_eager(models_dir: Path, tmp_path: Path, model_id: str) -> None:
    entry = read_entry(models_dir / model_id)
    module = build_module(entry)
    engine = build_engine(module, entry, tmp_path, CPU, budget_s=BUDGET_S)
    assert engine.name == "onnxruntime", engine.reason
    x = probe_batch(engine_mod.input_shape(entry), 5, CPU) * 2 + 0.5  # not the probe the check used
    with torch.no_grad():
        ref = module(x)
    for n in (1, 5):
        out = engine.forward(x[:n])
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device == CPU
        assert out.shape == (n, len(entry.manifest.labels))
        assert (out - ref[:n]).abs().max() <= TOLERANCE * max(1.0, float(ref.abs().max()))
        assert torch.equal(out.argmax(1), ref[:n].argmax(1))


def test_cache_reused_and_batch_sizes_cached(models_dir: Path, tmp_path: Path, export_calls: list[str]) -> None:
    entry = read_entry(models_dir / "digits-cnn")
    module = build_module(entry)
    first = build_engine(module, entry, tmp_path, CPU, budget_s=BUDGET_S)
    onnx_file = tmp_path / "onnx" / f"digits-cnn-{entry.version}-{library_key()}.onnx"
    meta_file = onnx_file.with_suffix(".json")
    assert export_calls == ["torchscript"] and onnx_file.is_file() and meta_file.is_file()
    assert first.batch_size in CPU_CANDIDATES and first.grad_batch_size in CPU_GRAD_CANDIDATES
    assert first.batch_size == pick_batch_size(first.forward_images_per_s)
    stamps = onnx_file.stat().st_mtime_ns, meta_file.stat().st_mtime_ns

    second = build_engine(module, entry, tmp_path, CPU, budget_s=BUDGET_S)
    assert export_calls == ["torchscript"]  # not exported again
    assert (onnx_file.stat().st_mtime_ns, meta_file.stat().st_mtime_ns) == stamps  # nor re-measured
    assert (second.name, second.batch_size, second.grad_batch_size) == (
        "onnxruntime",
        first.batch_size,
        first.grad_batch_size,
    )

    # The sizes come from the file: edit it and a new build serves what it says.
    meta = json.loads(meta_file.read_text())
    (key,) = meta["devices"]
    other = next(c for c in CPU_CANDIDATES if c != first.batch_size and c > 3)
    meta["devices"][key]["batch_size"] = other
    meta_file.write_text(json.dumps(meta))
    assert build_engine(module, entry, tmp_path, CPU, budget_s=BUDGET_S).batch_size == other


def test_a_checked_file_is_not_checked_again_and_other_bytes_are(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device's entry keeps the SHA-256 of the ONNX file it checked: the same bytes load
    without the eager check; other bytes under that name (here another model's export) are
    checked again, and fail it."""
    checks: list[tuple[int, ...]] = []
    real = engine_mod.check_against_eager

    def counting(eager, forward, probe, sizes, tol):  # type: ignore[no-untyped-def]
        checks.append(tuple(sizes))
        return real(eager, forward, probe, sizes, tol)

    monkeypatch.setattr(engine_mod, "check_against_eager", counting)
    entry = read_entry(models_dir / "digits-cnn")
    module = build_module(entry)
    build_engine(module, entry, tmp_path, CPU, budget_s=BUDGET_S)
    onnx_file = tmp_path / "onnx" / f"digits-cnn-{entry.version}-{library_key()}.onnx"
    (device,) = json.loads(onnx_file.with_suffix(".json").read_text())["devices"].values()
    assert device["onnx_sha256"] == file_sha256(onnx_file) and checks

    checks.clear()
    again = build_engine(module, entry, tmp_path, CPU, budget_s=BUDGET_S)
    assert again.name == "onnxruntime" and checks == []

    other = copy.deepcopy(module)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    engine_mod.export_onnx(other, probe_batch(engine_mod.input_shape(entry), 2, CPU), onnx_file, "torchscript")
    third = build_engine(module, entry, tmp_path, CPU, budget_s=BUDGET_S)
    assert checks and third.name == "eager" and third.reason


def test_pick_batch_size_smallest_within_five_percent() -> None:
    assert pick_batch_size({1: 10.0, 4: 50.0, 8: 98.0, 16: 100.0, 32: 80.0}) == 8
    assert pick_batch_size({1: 10.0, 4: 50.0, 8: 90.0, 16: 100.0}) == 16
    assert pick_batch_size({4: 7.0}) == 4


def test_check_rejects_a_logit_off_by_more_than_the_tolerance(models_dir: Path) -> None:
    entry = read_entry(models_dir / "digits-cnn")
    module = build_module(entry)
    probe = probe_batch((1, 8, 8), 3, CPU)
    with torch.no_grad():
        bound = TOLERANCE * max(1.0, float(module(probe).abs().max()))
    shifted = copy.deepcopy(module)
    # The last layer is linear: its bias shifts logit 3 by exactly this much, nothing else.
    shifted.fc.bias[3] += 2 * bound
    with pytest.raises(EngineUnavailable, match="max .logit diff"):
        check_against_eager(eager_forward(module), eager_forward(shifted), probe, (1, 3), TOLERANCE)
    shifted.fc.bias[3] -= 1.5 * bound
    worst = check_against_eager(eager_forward(module), eager_forward(shifted), probe, (1, 3), TOLERANCE)
    assert worst == pytest.approx(0.5 * bound, rel=0.01)


class SpectralNet(nn.Module):
    """Singular values of conv features: ``aten::linalg_svdvals`` has no ONNX export."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.linalg.svdvals(self.conv(x).flatten(2)))


class SignFlipNet(nn.Module):
    """A python branch per sample on its data: the tracer freezes the batch size and the
    branches it saw, torch.export refuses the data-dependent ``if``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = [row if row.sum() > 0 else -row for row in x.flatten(1)]
        return self.fc(torch.stack(rows))


class AntialiasNet(nn.Module):
    """An antialiased downscale: the tracer has no ``aten::_upsample_bilinear2d_aa``, the
    torch.export-based exporter has (ONNX ``Resize`` with ``antialias=1``, opset 18)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = nn.functional.interpolate(self.conv(x), size=(4, 4), mode="bilinear", antialias=True)
        return self.fc(small.flatten(1))


def test_second_exporter_when_the_tracer_fails(tmp_path: Path, export_calls: list[str]) -> None:
    torch.manual_seed(0)
    module = AntialiasNet().eval()
    entry = _entry(tmp_path, "antialias")
    engine = build_engine(module, entry, tmp_path, CPU, budget_s=BUDGET_S)
    assert export_calls == ["torchscript", "dynamo"]
    assert engine.name == "onnxruntime", engine.reason
    meta = json.loads((tmp_path / "onnx" / f"antialias-{entry.version}-{library_key()}.json").read_text())
    assert meta["exporter"] == "dynamo"
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert (engine.forward(x) - module(x)).abs().max() <= TOLERANCE


def test_fallback_to_eager_when_export_fails(tmp_path: Path, export_calls: list[str]) -> None:
    torch.manual_seed(0)
    module = SpectralNet().eval()
    entry = _entry(tmp_path, "spectral")
    engine = build_engine(module, entry, tmp_path, CPU, exporters=("torchscript",), budget_s=BUDGET_S)
    assert engine.name == "eager" and "linalg_svdvals" in engine.reason
    assert not list((tmp_path / "onnx").glob("*.onnx")) and not list((tmp_path / "onnx").glob(".*tmp"))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(engine.forward(x), module(x))
    # The failure is remembered: the next start goes straight to eager.
    again = build_engine(module, entry, tmp_path, CPU, exporters=("torchscript",), budget_s=BUDGET_S)
    assert export_calls == ["torchscript"] and (again.name, again.reason) == ("eager", engine.reason)


def test_fallback_when_the_export_is_wrong(tmp_path: Path, export_calls: list[str]) -> None:
    torch.manual_seed(0)
    module = SignFlipNet().eval()
    engine = build_engine(module, _entry(tmp_path, "signflip"), tmp_path, CPU, budget_s=BUDGET_S)
    assert export_calls == ["torchscript", "dynamo"]
    assert engine.name == "eager"
    assert "torchscript: EngineUnavailable: batch of 1" in engine.reason and "dynamo:" in engine.reason


def test_concurrent_builds_export_once(models_dir: Path, tmp_path: Path, export_calls: list[str]) -> None:
    entry = read_entry(models_dir / "digits-cnn")
    module = build_module(entry)
    engines = []

    def build() -> None:
        engines.append(build_engine(module, entry, tmp_path, CPU, budget_s=BUDGET_S))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e.name for e in engines] == ["onnxruntime"] * 2
    assert export_calls == ["torchscript"]
    assert sorted(p.suffix for p in (tmp_path / "onnx").iterdir()) == [".json", ".lock", ".onnx"]


ALLOC_LOOP = """
import resource, numpy as np
for i in range(30):  # 64 MiB blocks: above glibc's largest dynamic mmap threshold (32 MiB)
    a = np.ones(1 << 23)
    del a
    if i == 9:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


def test_allocator_env_keeps_big_blocks() -> None:
    """glibc re-maps (and page-faults) every big block by default; ALLOCATOR_ENV reuses them."""

    def faults(env: dict[str, str]) -> int:
        out = subprocess.run([sys.executable, "-c", ALLOC_LOOP], env=env, capture_output=True, text=True, check=True)
        return int(out.stdout)

    plain = faults({"PATH": "/usr/bin:/bin"})
    tuned = faults({"PATH": "/usr/bin:/bin", **ALLOCATOR_ENV})
    assert plain >= 20  # each of the 20 blocks faulted in again (fewer faults with huge pages)
    assert tuned < plain // 20


def test_unreadable_cached_file_falls_back_to_eager(models_dir: Path, tmp_path: Path) -> None:
    entry = read_entry(models_dir / "digits-cnn")
    module = build_module(entry)
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / f"digits-cnn-{entry.version}-{library_key()}.onnx").write_bytes(b"not an onnx model")
    engine = build_engine(module, entry, tmp_path, CPU, budget_s=BUDGET_S)
    assert engine.name == "eager" and engine.reason.startswith("loading digits-cnn-")
