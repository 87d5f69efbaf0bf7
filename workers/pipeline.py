"""The generic job pipeline every kind shares: load inputs, pick targets, call the kind.

Validate params -> load the model (cached) -> decode and preprocess the images -> one
forward pass for probabilities -> resolve targets -> ``workers.explain.<kind>.run``.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pydantic import BaseModel

from schemas.errors import BadParams
from schemas.models import Preprocessing
from schemas.stored_images import decode_rgb
from workers.explain.base import Inputs, KindResult, LoadedModel, ProgressFn
from workers.registry import ModelCache, input_region, preprocess


@dataclass
class JobContext:
    """What some kinds need beyond model, inputs and params (a kind's ``run`` asks for it by
    declaring a ``context`` argument)."""

    cache_dir: Path
    models_dir: Path
    files: dict[str, bytes] = field(default_factory=dict)  # extra uploads by name (KindSpec.files)
    job_id: str = ""
    data_dir: Path = Path("var/data")  # settings.data_dir: data sets and data-set jobs' large artifacts
    datasets: dict[str, Path] = field(default_factory=dict)  # uploaded data sets the params name: id -> zip
    other_models: dict[str, str] = field(default_factory=dict)  # id -> version submitted (JobPayload.other_models)
    models: ModelCache | None = None  # the worker's cache, for other_model()

    def other_model(self, model_id: str) -> LoadedModel:
        """Another model the job uses, at the version it was submitted against (a changed
        model is a 422, as for the job's own model)."""
        if self.models is None:
            raise BadParams(f"model {model_id!r}: this job has no model cache to load it from")
        return self.models.get(model_id, self.other_models.get(model_id))


def forward_in_chunks(
    model: LoadedModel, x: torch.Tensor, batch_size: int | None = None, predict: bool = False
) -> torch.Tensor:
    """Logits ``(N, K)`` of ``x`` ``(N, C, H, W)`` through the fast engine, in chunks
    (``predict``: the predict batcher's session, ``LoadedModel.predict_forward``, if any)."""
    chunk = batch_size or model.batch_size
    forward = (model.predict_forward if predict else None) or model.forward
    if len(x) <= chunk:
        return forward(x)
    return torch.cat([forward(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def resolve_targets(target: int | list[int] | None, probs: torch.Tensor) -> torch.Tensor:
    """``(N,)`` class indices: the predicted class when ``target`` is None, else the given
    index (one for all images, or one per image), checked against the number of classes."""
    n, k = probs.shape
    if target is None:
        return probs.argmax(1)
    targets = [target] * n if isinstance(target, int) else list(target)
    if len(targets) != n:
        raise BadParams(f"target has {len(targets)} entries for {n} images")
    bad = [t for t in targets if not 0 <= t < k]
    if bad:
        raise BadParams(f"target {bad[0]} is out of range: the model has {k} classes (0..{k - 1})")
    return torch.tensor(targets, dtype=torch.long, device=probs.device)


def decode(data: bytes) -> Image.Image:
    """A stored input (``schemas.stored_images``) as an RGB PIL image."""
    return decode_rgb(data)


def load_inputs(model: LoadedModel, pngs: list[bytes], params: BaseModel) -> Inputs:
    if not pngs:  # dataset-level kinds (e.g. u_sweep on a registered split) take no images
        h, w = model.manifest.preprocessing.size
        c = 1 if model.manifest.preprocessing.mode == "L" else 3
        empty = torch.zeros(0, c, h, w, device=model.device)
        probs = torch.zeros(0, model.num_classes, device=model.device)
        return Inputs(empty, [], torch.zeros(0, dtype=torch.long, device=model.device), probs)
    pre = preprocessing_of(model, params)
    images = [decode(b) for b in pngs]
    x, display = preprocess(images, pre)
    x = x.to(model.device)
    probs = forward_in_chunks(model, x).softmax(1)
    targets = resolve_targets(getattr(params, "target", None), probs)
    regions = [input_region(img.width, img.height, pre) for img in images]
    sizes = [(img.height, img.width) for img in images]
    return Inputs(images=x, display=display, targets=targets, probs=probs, regions=regions, sizes=sizes)


def preprocessing_of(model: LoadedModel, params: BaseModel) -> Preprocessing:
    """The model's preprocessing, with the job's ``resize`` choice when it makes one."""
    resize = getattr(params, "resize", None)
    pre = model.manifest.preprocessing
    return pre if resize is None else pre.model_copy(update={"resize": resize})


def with_regions(result: KindResult, inputs: Inputs) -> KindResult:
    """``result`` with ``input_regions`` in its summary: which region of each upload its maps
    cover (absent for kinds without uploaded images)."""
    if inputs.regions:
        result.summary.setdefault("input_regions", inputs.regions)
    return result


def kind_module(kind: str) -> Any:
    return importlib.import_module(f"workers.explain.{kind}")


def execute(
    models: ModelCache,
    kind: str,
    model_id: str,
    model_version: str | None,
    pngs: list[bytes],
    params: BaseModel,
    progress: ProgressFn,
    context: JobContext,
) -> KindResult:
    model = models.get(model_id, model_version)
    if context.models is None:
        context.models = models
    progress(0, 1, "preprocessing")
    inputs = load_inputs(model, pngs, params)
    run = kind_module(kind).run
    if "context" in inspect.signature(run).parameters:
        return with_regions(run(model, inputs, params, progress, context=context), inputs)
    return with_regions(run(model, inputs, params, progress), inputs)
