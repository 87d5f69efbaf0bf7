"""Preparing a model for the rule-based attribution methods, so that their rules really apply.

Captum's DeepLift, GuidedBackprop, Deconvolution and LRP change the backward pass of
*modules* of given types, and assume each module is called once per forward pass. Models
break both assumptions without any error: ``efficientnet-lite0`` uses ``nn.ReLU6`` (a type
none of these methods knows, so its gradient passes unchanged) and calls one activation
module two or three times per block (DeepLift then mixes the reference activations of the
calls); torchvision's ResNet blocks call ``self.relu`` twice. The map silently falls back to
(a mix with) the plain gradient.

``prepare(model, family)`` returns a deep copy of the model, built once per model version
and family, in which:

- every call site has its own module (``torch.fx`` traces the forward; a module called a
  second time is replaced at that call by a copy of it), and ``F.relu`` calls become
  ``nn.ReLU`` modules;
- ``nn.ReLU6`` follows the family's rule: for guided backprop / deconvolution it becomes
  :class:`GuidedReLU6` (an ``nn.ReLU`` subclass computing ``min(max(x, 0), 6)``, so the
  ReLU rule applies to it); for DeepLift it stays one ``nn.ReLU6`` module, and
  :func:`deeplift` / :func:`deeplift_shap` give Captum's classes the Rescale rule for it
  (Captum's own ``nonlinear``, the rule it applies to ReLU). An earlier version wrote ReLU6
  as ``relu(x) - relu(x - 6)``, two hooked ReLUs and a copy per activation: the same map,
  but 30% more per forward+backward pass and twice Captum's per-activation hook work;
- for LRP, tensor additions (residual connections) become Captum's ``Addition_Module`` so
  the epsilon rule splits relevance between the branches instead of copying it to both,
  and shape-only layers (``Flatten``, ``Identity``) get an identity rule.

What cannot be prepared is rejected with :class:`UnsupportedMethod` naming the layer (an
activation type without a rule, a layer type LRP has no rule for, a module that computes
itself while having children, a functional nonlinearity the tracer saw). The prepared
copy is checked against the original on a probe batch before use. The cached model itself
is never modified.
"""

from __future__ import annotations

import copy
import functools
import operator
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from schemas.errors import JobFailure, UnsupportedMethod
from workers.explain.base import LoadedModel

Family = Literal["guided", "deeplift", "lrp"]

METHOD_FAMILY: dict[str, Family] = {
    "guided_backprop": "guided",
    "deconvolution": "guided",
    "guided_gradcam": "guided",
    "deeplift": "deeplift",
    "deeplift_shap": "deeplift",
    "lrp": "lrp",
}

_FAMILY_NAME = {"guided": "guided backprop / deconvolution", "deeplift": "DeepLift", "lrp": "LRP"}


class GuidedReLU6(nn.ReLU):
    """ReLU6, typed as ``nn.ReLU`` so that guided backprop and deconvolution apply the ReLU
    rule to it (Springenberg et al. 2015: pass only positive gradients through the unit)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(input, 0.0, 6.0)

    def extra_repr(self) -> str:
        return "ReLU6 with the guided-backprop ReLU rule"


class _ReLU6RescaleRule:
    """DeepLift's Rescale rule for ``nn.ReLU6`` too (Shrikumar et al. 2017, §3.5.1: the
    multiplier of any elementwise nonlinearity is ``Δy / Δx``, its gradient where ``Δx ≈ 0``).
    Captum applies exactly this rule (``deep_lift.nonlinear``) to ReLU, ELU, Sigmoid, Tanh...
    but looks modules up by exact type in ``SUPPORTED_NON_LINEAR``, which lacks ReLU6. This
    mixin adds it for our instances only (Captum's table, and ``ca.DeepLift`` elsewhere in the
    process, stay as they are)."""

    def _is_non_linear(self, module: nn.Module) -> bool:
        return type(module) is nn.ReLU6 or super()._is_non_linear(module)  # type: ignore[misc]

    def _backward_hook(self, module: nn.Module, grad_input: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
        if type(module) is not nn.ReLU6:
            return super()._backward_hook(module, grad_input, grad_output)  # type: ignore[misc]
        from captum.attr._core.deep_lift import nonlinear

        if not (hasattr(module, "input") and hasattr(module, "output")):
            raise RuntimeError(f"DeepLift: {module} was called more than once in one forward pass")
        multipliers = nonlinear(module, module.input, module.output, grad_input, grad_output, eps=self.eps)  # type: ignore[attr-defined]
        del module.input
        del module.output
        return multipliers


@functools.cache
def _with_relu6_rule(cls: type) -> type:
    """Captum's ``cls`` (``DeepLift`` or ``DeepLiftShap``) with the Rescale rule for ReLU6."""
    return type(f"{cls.__name__}ReLU6", (_ReLU6RescaleRule, cls), {})


def deeplift(module: nn.Module) -> Any:
    """Captum's ``DeepLift`` on a module prepared for the ``deeplift`` family (ReLU6 included)."""
    from captum.attr import DeepLift

    return _with_relu6_rule(DeepLift)(module)


def deeplift_shap(module: nn.Module) -> Any:
    """Captum's ``DeepLiftShap`` on a module prepared for the ``deeplift`` family."""
    from captum.attr import DeepLiftShap

    return _with_relu6_rule(DeepLiftShap)(module)


def is_activation(module: nn.Module) -> bool:
    """A pointwise nonlinearity module (every class of ``torch.nn.modules.activation``, and
    the Swish modules of the EfficientNet packages)."""
    cls = type(module)
    return cls.__module__ == "torch.nn.modules.activation" or cls.__name__ in {"Swish", "MemoryEfficientSwish"}


def _is_relu6(module: nn.Module) -> bool:
    return type(module) is nn.ReLU6 or (
        type(module) is nn.Hardtanh and module.min_val == 0.0 and module.max_val == 6.0  # type: ignore[attr-defined]
    )


def is_max_pool(module: nn.Module) -> bool:
    return isinstance(module, nn.MaxPool1d | nn.MaxPool2d | nn.MaxPool3d)


def _has_nonlinearity(module: nn.Module) -> bool:
    return any(is_activation(m) or is_max_pool(m) for m in module.modules())


class _Tracer(fx.Tracer):
    """Traces into every module that contains a nonlinearity (so each activation call is
    visible), keeps the rest (and the layers named in ``keep``) as single calls."""

    def __init__(self, keep: set[str]) -> None:
        super().__init__()
        self.keep = keep

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.keep or not any(True for _ in m.children()):
            return True
        return not _has_nonlinearity(m)


_FUNCTIONAL_RELU: set[Any] = {F.relu, torch.relu, torch.relu_}
_FUNCTIONAL_NONLINEAR: set[Any] = {
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.silu, F.gelu, F.elu, F.leaky_relu, F.relu6,
    F.hardtanh, F.hardswish, F.hardsigmoid, F.mish, F.softplus, F.softmax, torch.softmax,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool2d, torch.amax, torch.max, torch.min,
    torch.clamp, torch.clip,
}  # fmt: skip
_METHOD_NONLINEAR = {"sigmoid", "tanh", "softmax", "clamp", "clip", "max", "min", "amax"}
_ADD = {operator.add, operator.iadd, torch.add}
_MUL = {operator.mul, operator.imul, torch.mul}


def _node_where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        return f"{node.name} in {list(stack)[-1] or 'the model'}"
    return node.name


def _rewrite_graph(gm: fx.GraphModule, family: Family) -> None:
    """Give every call its own module; F.relu -> nn.ReLU; for LRP tensor sums -> Addition_Module.
    Raises UnsupportedMethod on functional nonlinearities the family's rules cannot see."""
    from captum.attr._utils.custom_modules import Addition_Module

    graph = gm.graph
    seen: Counter[str] = Counter()
    fresh = 0

    def install(node: fx.Node, module: nn.Module, stem: str) -> None:
        nonlocal fresh
        fresh += 1
        name = f"{stem}_call{fresh}"
        gm.add_submodule(name, module)
        with graph.inserting_before(node):
            new = graph.call_module(name, tuple(node.args[:2] if stem == "_add" else node.args[:1]))
        node.replace_all_uses_with(new)
        graph.erase_node(node)

    for node in list(graph.nodes):
        if node.op == "call_module":
            seen[str(node.target)] += 1
            if seen[str(node.target)] > 1:
                target = str(node.target)
                fresh += 1
                name = f"{target}_call{fresh}"
                gm.add_submodule(name, copy.deepcopy(gm.get_submodule(target)))
                node.target = name
        elif (node.op == "call_function" and node.target in _FUNCTIONAL_RELU) or (
            node.op == "call_method" and node.target in ("relu", "relu_")
        ):
            install(node, nn.ReLU(), "_relu")
        elif family != "guided" and (
            (node.op == "call_function" and node.target in _FUNCTIONAL_NONLINEAR)
            or (node.op == "call_method" and node.target in _METHOD_NONLINEAR)
        ):
            raise UnsupportedMethod(
                f"{_FAMILY_NAME[family]} cannot apply its rule to the functional "
                f"{getattr(node.target, '__name__', node.target)} at {_node_where(node)}: "
                "the model computes it without a module to hook",
                details={"layer": _node_where(node), "type": str(getattr(node.target, "__name__", node.target))},
            )
        elif (
            family != "guided"
            and node.op == "call_function"
            and node.target in _MUL
            and all(isinstance(a, fx.Node) for a in node.args[:2])
        ):
            raise UnsupportedMethod(
                f"{_FAMILY_NAME[family]} has no rule for the product of two tensors at {_node_where(node)} "
                "(e.g. squeeze-and-excitation gating)",
                details={"layer": _node_where(node), "type": "mul"},
            )
        elif (
            family == "lrp"
            and node.op == "call_function"
            and node.target in _ADD
            and len(node.args) == 2
            and not node.kwargs
            and all(isinstance(a, fx.Node) for a in node.args)
        ):
            install(node, Addition_Module(), "_add")
    _isolate_activation_inputs(gm)
    graph.lint()
    gm.recompile()


def _isolate_activation_inputs(gm: fx.GraphModule) -> None:
    """Give each activation module an input tensor no other operation reads.

    Captum's backward hooks sit on the activation's *input tensor* and replace its whole
    gradient; when that tensor also feeds another operation (a skip connection, a second
    branch), the other operation's gradient would be overwritten. A clone in between keeps
    the two apart."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        if not (is_activation(gm.get_submodule(str(node.target))) or is_max_pool(gm.get_submodule(str(node.target)))):
            continue
        source = node.args[0]
        if len(source.users) > 1:
            with graph.inserting_before(node):
                copy_node = graph.call_method("clone", (source,))
            node.args = (copy_node, *node.args[1:])


def leaf_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if n and not any(True for _ in m.children())]


def _reused_modules(module: nn.Module, probe: torch.Tensor) -> list[str]:
    """Leaf modules called more than once in one forward pass (counted with temporary hooks
    on the copy being prepared)."""
    calls: Counter[str] = Counter()
    handles = []
    for name, m in leaf_modules(module):
        handles.append(m.register_forward_pre_hook(lambda _m, _i, name=name: calls.update([name])))
    try:
        with torch.no_grad():
            module(probe)
    finally:
        for h in handles:
            h.remove()
    return [n for n, c in calls.items() if c > 1]


def lrp_layer_rules(module: nn.Module) -> None:
    """Attach an identity-like epsilon rule to the shape-only layers Captum has no default
    for (``Flatten``, ``Identity``, ``Unflatten``); Captum removes rules after every call, so
    this runs before each one."""
    from captum.attr._utils.lrp_rules import EpsilonRule

    for _, m in leaf_modules(module):
        if isinstance(m, nn.Flatten | nn.Identity | nn.Unflatten):
            m.rule = EpsilonRule()  # type: ignore[assignment]


def lrp_cleanup(module: nn.Module) -> None:
    """Drop the activations Captum's LRP leaves on each layer (it deletes ``activation``,
    but stores ``activations``), so no tensors of a job stay referenced."""
    for m in module.modules():
        m.__dict__.pop("activations", None)
        m.__dict__.pop("rule", None)


def _check_family(module: nn.Module, family: Family) -> None:
    leaves = leaf_modules(module)
    if family == "guided":
        bad = [(n, m) for n, m in leaves if is_activation(m) and not isinstance(m, nn.ReLU)]
        if bad:
            n, m = bad[0]
            raise UnsupportedMethod(
                f"guided backprop / deconvolution define their rule for ReLU-type activations only; "
                f"layer {n!r} ({type(m).__name__}) would pass plain gradients",
                details={"layer": n, "type": type(m).__name__},
            )
        if not any(isinstance(m, nn.ReLU) for _, m in leaves):
            raise UnsupportedMethod(
                "guided backprop / deconvolution: the model has no ReLU-type activation module, "
                "so the map would equal the plain gradient",
                details={"layer": None, "type": None},
            )
    elif family == "deeplift":
        from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR

        for n, m in leaves:
            if is_activation(m) and type(m) not in SUPPORTED_NON_LINEAR and type(m) is not nn.ReLU6:
                raise UnsupportedMethod(
                    f"DeepLift has no rule for layer {n!r} ({type(m).__name__})",
                    details={"layer": n, "type": type(m).__name__},
                )
    else:
        from captum.attr._core.lrp import SUPPORTED_LAYERS_WITH_RULES, SUPPORTED_NON_LINEAR_LAYERS

        ok = set(SUPPORTED_LAYERS_WITH_RULES) | set(SUPPORTED_NON_LINEAR_LAYERS)
        ok |= {nn.Flatten, nn.Identity, nn.Unflatten}
        for n, m in module.named_modules():
            has_children = any(True for _ in m.children())
            if has_children and n and any(True for _ in m.parameters(recurse=False)):
                raise UnsupportedMethod(
                    f"LRP has no rule for layer {n!r} ({type(m).__name__}): it computes with its own "
                    "weights but also has sub-layers, so Captum would skip its computation",
                    details={"layer": n, "type": type(m).__name__},
                )
            if not has_children and n and type(m) not in ok:
                raise UnsupportedMethod(
                    f"LRP has no rule for layer {n!r} ({type(m).__name__})",
                    details={"layer": n, "type": type(m).__name__},
                )


def _swap_relu6(module: nn.Module, family: Family) -> None:
    make: Callable[[], nn.Module] | None = {"guided": GuidedReLU6, "deeplift": nn.ReLU6}.get(family)
    if make is None:
        return
    for name, m in list(module.named_modules()):
        if name and _is_relu6(m) and not (family == "deeplift" and type(m) is nn.ReLU6 and not m.inplace):
            parent, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, leaf, make())


def probe_input(model: LoadedModel, n: int = 2, seed: int = 0) -> torch.Tensor:
    """``(n, C, H, W)`` uniform noise over the model's valid input range."""
    pre = model.manifest.preprocessing
    c = 1 if pre.mode == "L" else 3
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.rand((n, c, *pre.size), generator=gen) * 255 * pre.scale
    mean = torch.tensor(pre.mean[:c])[:, None, None]
    std = torch.tensor(pre.std[:c])[:, None, None]
    return ((pixels - mean) / std).to(model.device)


def build_prepared(model: LoadedModel, family: Family, keep: str | None = None) -> nn.Module:
    """A prepared deep copy of ``model.module`` for ``family`` (see the module docstring)."""
    original = model.module
    if isinstance(original, torch.jit.ScriptModule):
        raise UnsupportedMethod(
            f"{_FAMILY_NAME[family]} needs an nn.Module whose layers it can hook; {model.id!r} is a TorchScript model",
            details={"layer": None, "type": "ScriptModule"},
        )
    module: nn.Module = copy.deepcopy(original).eval()
    probe = probe_input(model, n=1)
    traced = True
    try:
        graph = _Tracer({keep} if keep else set()).trace(module)
        gm = fx.GraphModule(module, graph, class_name=type(module).__name__ + "Prepared")
    except Exception:  # noqa: BLE001 - any tracing failure: fall back to the module as it is
        traced = False
    if traced:
        _rewrite_graph(gm, family)
        module = gm
    elif family != "guided":
        reused = _reused_modules(module, probe)
        if reused:
            raise UnsupportedMethod(
                f"{_FAMILY_NAME[family]} needs each layer called once per forward pass; layer "
                f"{reused[0]!r} is called several times and torch.fx cannot trace the model to "
                "give each call its own copy",
                details={"layer": reused[0], "type": type(module.get_submodule(reused[0])).__name__},
            )
    _swap_relu6(module, family)
    _check_family(module, family)
    for p in module.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        want, got = original(probe), module(probe)
    if not torch.allclose(want, got, rtol=1e-4, atol=1e-4 * float(want.abs().max()) + 1e-6):
        raise JobFailure(
            f"the model prepared for {_FAMILY_NAME[family]} does not match {model.id!r} "
            f"(max logit difference {float((want - got).abs().max()):.3g})",
            type="model_preparation",
        )
    return module


_prepared: dict[tuple[str, str, Family, str | None], nn.Module | UnsupportedMethod] = {}
_lock = threading.Lock()


def prepare(model: LoadedModel, family: Family, keep: str | None = None) -> nn.Module:
    """The prepared copy of ``model`` for ``family`` (built once per model version; ``keep``
    names a layer that must stay one module, e.g. Grad-CAM's)."""
    key = (model.id, model.version, family, keep)
    with _lock:
        if key not in _prepared:
            for k in [k for k in _prepared if k[0] == model.id and k[1] != model.version]:
                del _prepared[k]
            try:
                _prepared[key] = build_prepared(model, family, keep)
            except UnsupportedMethod as e:
                _prepared[key] = e  # the same answer next time, without tracing again
        found = _prepared[key]
    if isinstance(found, UnsupportedMethod):
        raise UnsupportedMethod(found.message, details=found.details)
    return found
