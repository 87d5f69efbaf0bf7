"""Kind ``compare``: several attribution methods on the same images, as the Captum comparison
paper (Sharma, "Explainability for Image Classification with ResNet") does in its Fig. 1
(heat map and blended heat map per method) and Table I (Max Sensitivity per method).

Every method runs through :func:`workers.explain.attribution.attribute` with the job's
targets, batch size and seed, and gets the job's quality scores. A method the model does not
support (``UnsupportedMethod``) becomes a table row with its error; any other error ends the
job.

Artifacts: ``compare.csv`` (method, runtime_s, sensitivity_max, infidelity, error; scores are
means over the images), ``compare-grid.png`` (per image: the image and one heatmap per
method, with the overlays in the row below), and per method and image the 2-D map
``{i}-{label}-map.npy``.
"""

from __future__ import annotations

import csv
import io
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from schemas.attribution import COMPARE_DATASET_IMAGES, CompareParams
from schemas.attribution import _Method as MethodParams
from schemas.errors import UnsupportedMethod
from workers import render
from workers.dataset_source import dataset_inputs
from workers.explain.attribution import attribute, quality_scores
from workers.explain.base import Artifact, Inputs, KindResult, LoadedModel, ProgressFn


def method_labels(methods: Sequence[MethodParams]) -> list[str]:
    """Short unique labels: the method name, the noise tunnel's type, ``#k`` for repeats."""
    base = [f"{m.method}-{m.nt_type}" if m.method == "noise_tunnel" else m.method for m in methods]  # type: ignore[attr-defined]
    seen: Counter[str] = Counter()
    out = []
    for b in base:
        seen[b] += 1
        out.append(b if seen[b] == 1 else f"{b}#{seen[b]}")
    return out


def _stage(progress: ProgressFn, label: str, k: int, n: int) -> ProgressFn:
    def report(done: int, total: int, stage: str) -> None:
        progress(done, total, f"{label} ({k + 1}/{n}): {stage}")

    return report


def grid_png(displays: list[np.ndarray], labels: list[str], maps: dict[str, list[np.ndarray]]) -> bytes:
    """Per image two rows: the image then one heatmap per method; below, the overlays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    shown = [lab for lab in labels if lab in maps]
    cols = 1 + len(shown)
    rows = 2 * len(displays)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    for i, image in enumerate(displays):
        axes[2 * i, 0].imshow(image)
        axes[2 * i, 0].set_title("input", fontsize=8)
        for j, lab in enumerate(shown, start=1):
            heat = np.asarray(Image.open(io.BytesIO(render.heatmap_png(maps[lab][i]))))
            over = np.asarray(Image.open(io.BytesIO(render.overlay_png(maps[lab][i], image))))
            axes[2 * i, j].imshow(heat)
            axes[2 * i, j].set_title(lab, fontsize=8)
            axes[2 * i + 1, j].imshow(over)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def run(
    model: LoadedModel, inputs: Inputs, params: CompareParams, progress: ProgressFn, context: Any = None
) -> KindResult:
    """The methods on the request's images, or on the first ``limit`` images of ``dataset``."""
    if params.dataset is not None:
        inputs = dataset_inputs(model, params, context, COMPARE_DATASET_IMAGES)
    labels = method_labels(params.methods)
    rows: list[dict[str, Any]] = []
    maps: dict[str, list[np.ndarray]] = {}
    artifacts: list[Artifact] = []
    for k, (label, method) in enumerate(zip(labels, params.methods, strict=True)):
        p = method.model_copy(
            update={
                "batch_size": params.batch_size,
                "seed": params.seed,
                "sensitivity_max": params.sensitivity_max,
                "infidelity": params.infidelity,
            }
        )
        report = _stage(progress, label, k, len(labels))
        try:
            t0 = time.perf_counter()
            attr = attribute(model, inputs.images, inputs.targets, p, report)
            runtime = time.perf_counter() - t0
            scores = quality_scores(model, inputs.images, inputs.targets, attr, p, report)
        except UnsupportedMethod as e:
            rows.append({"method": label, "name": method.method, "error": {"type": e.type, "message": e.message}})
            continue
        maps[label] = [render.to_2d(attr[i], p.aggregation) for i in range(len(inputs))]
        for i, m in enumerate(maps[label]):
            artifacts.append(Artifact(f"{i}-{label}-map.npy", render.npy_bytes(m), "application/x-npy"))
        rows.append(
            {
                "method": label,
                "name": method.method,
                "runtime_s": runtime,
                **{name: float(np.mean(v)) for name, v in scores.items()},
                "per_image": {name: v for name, v in scores.items()},
                "params": p.model_dump(mode="json", exclude={"target", "batch_size", "sensitivity_max", "infidelity"}),
            }
        )
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "runtime_s", "sensitivity_max", "infidelity", "error"])
    for row in rows:
        writer.writerow(
            [
                row["method"],
                f"{row['runtime_s']:.4f}" if "runtime_s" in row else "",
                f"{row['sensitivity_max']:.6g}" if "sensitivity_max" in row else "",
                f"{row['infidelity']:.6g}" if "infidelity" in row else "",
                row["error"]["message"] if "error" in row else "",
            ]
        )
    artifacts.append(Artifact("compare.csv", buf.getvalue().encode(), "text/csv"))
    if maps:
        artifacts.append(Artifact("compare-grid.png", grid_png(inputs.display, labels, maps), "image/png"))
    images = [
        {
            "index": i,
            "target": int(inputs.targets[i]),
            "label": model.manifest.labels[int(inputs.targets[i])],
            "probability": float(inputs.probs[i, int(inputs.targets[i])]),
        }
        for i in range(len(inputs))
    ]
    return KindResult({"methods": rows, "images": images}, artifacts)
