"""The one chain: trace -> score -> plan -> apply (-> stats). The CLI and the tests call it.

``run`` traces the model once and returns every intermediate a caller may want to show or save;
``plan`` and ``prune`` are its public faces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .dependency_graph import DependencyGraph
from .dependency_graph import trace as trace_graph
from .dependency_graph.tracing import normalize_inputs
from .errors import PlanError
from .plan import Plan, check_ratio
from .planner import leaf_names, plan_from_graph, split_options
from .rewrite import MODES, OUTPUTS, apply_to_graph
from .sparsity import UNSTRUCTURED, attach_masks, check_sparsity, masks_of, prune_unstructured
from .stats import ModelStats, stats

__all__ = ["Result", "run", "plan", "prune", "SparseResult", "run_unstructured"]


@dataclass
class Result:
    """What one pipeline run made."""

    graph: DependencyGraph
    plan: Plan
    model: nn.Module | None  # the pruned (or masked) model; None when only planning
    before: ModelStats | None = None
    after: ModelStats | None = None


def _noop(_: str) -> None:
    pass


def run(model: nn.Module, example_inputs, method: str = "l1", ratio: float = 0.5, data=None, *, plan: Plan | None = None,
        mode: str | None = "prune", output: str = "auto", loss: Callable | None = None, measure: bool = False,
        progress: Callable[[str], None] | None = None, **options) -> Result:
    """Trace ``model`` once, plan with ``method`` (or replay ``plan``) and apply it.

    ``output``: ``"auto"`` (the user's own class where its forward allows, else a ``GraphModule``
    with the reason in ``meta["surgery_output"]``), ``"module"`` or ``"graph"``.
    ``measure=True`` also counts params and MACs before and after. ``progress(text)`` is called at
    each step. ``mode=None`` stops after planning (``Result.model`` is then ``None``). ``model`` is
    never modified.
    """
    step = progress or _noop
    if method == UNSTRUCTURED and plan is None:
        raise PlanError(f"method {UNSTRUCTURED!r} removes single weights, not channels, and makes no channel plan; "
                        f"call surgery.prune(model, x, method={UNSTRUCTURED!r}, sparsity=0.9)")
    sub = options.pop("submodule", "") or (plan.options.get("submodule", "") if plan is not None else "")
    if sub:
        return _run_submodule(model, example_inputs, sub, method, ratio, data, plan=plan, mode=mode, output=output,
                              loss=loss, measure=measure, progress=progress, **options)
    if mode is not None and mode not in MODES:
        raise PlanError(f"unknown mode {mode!r}; known modes: {', '.join(MODES)}")
    if output not in OUTPUTS:
        raise PlanError(f"unknown output {output!r}; known outputs: {', '.join(OUTPUTS)}")
    inputs = normalize_inputs(example_inputs)
    if isinstance(data, str):  # text for a language model: "pydoc" or a .txt file, tokenised for it
        from .calibration.text import text_calibration

        data = text_calibration(data, model, inputs)
    if plan is None:
        check_ratio(ratio)
        opts, _ = split_options(method, options)  # fail on a bad option before any work
        leaves, free, gqa = leaf_names(model, opts.leaf_modules), opts.free_outputs, opts.gqa
    else:
        if options:
            raise PlanError(f"options {', '.join(sorted(options))} cannot be combined with a saved plan")
        leaves, free, gqa = plan.leaf_modules, tuple(plan.options.get("free_outputs", ())), plan.options.get("gqa", "kv")
    before = None
    if measure:
        step("counting params and MACs")
        before = stats(model, inputs)
    step("tracing the dependency graph")
    graph = trace_graph(model, inputs, leaves, free, gqa=gqa)
    applied: dict[str, object] = {}

    def verify(p: Plan):
        """Apply ``p`` (the rewrite raises RewriteError when it cannot honour it); keep the result."""
        applied.clear()
        applied["plan"], applied["model"] = p, apply_to_graph(graph, p)
        return applied["model"]

    if plan is None:
        step(f"scoring channels with {method}")

        def macs_of(p: Plan) -> float:
            return stats(verify(p), inputs).macs

        plan = plan_from_graph(model, graph, method, ratio, data, loss=loss, progress=progress, macs_of=macs_of,
                               verify=verify, **options)
    if mode is None:
        return Result(graph, plan, None, before)
    step("rebuilding the smaller model" if mode == "prune" else "masking the removed channels")
    reuse = applied["model"] if mode == "prune" and applied.get("plan") is plan else None
    out = apply_to_graph(graph, plan, mode, output, model, graph_result=reuse)
    after = None
    if measure:
        step("counting params and MACs")
        after = stats(out, inputs)
    return Result(graph, plan, out, before, after)


def _run_submodule(model, example_inputs, name, method, ratio, data, *, plan, mode, output, loss, measure, progress,
                   **options) -> Result:
    """Prune submodule ``name`` alone on the inputs it really receives; return the whole model."""
    from . import submodule
    from .methods import get_method

    if not isinstance(name, str):
        raise PlanError(f"submodule must be a qualified module name, got {name!r}")
    inputs = normalize_inputs(example_inputs)
    part = submodule.get(model, name)
    if plan is None:
        check_ratio(ratio)
        split_options(method, {**options, "submodule": name})
        if get_method(method).needs_labels and loss is None:
            raise PlanError(f"method {method!r} needs labels, which belong to the whole model's output; "
                            f"with submodule= use a method that needs none, or pass loss=")
    (progress or _noop)(f"finding the inputs of {name}")
    sub_inputs = submodule.capture_inputs(model, inputs, name)
    sub_data = None
    if data is not None:  # bounded by calib_batches: each batch is mapped through the whole model once
        sub_data = [(x, None) for x in submodule.sub_batches(model, name, data, options.get("calib_batches"))]
    if plan is not None:
        plan = dataclasses.replace(plan, options={k: v for k, v in plan.options.items() if k != "submodule"})
    res = run(part, sub_inputs, method, ratio, sub_data, plan=plan, mode=mode, output=output, loss=loss,
              progress=progress, **options)
    recorded = dataclasses.replace(res.plan, options={**res.plan.options, "submodule": name})
    if res.model is None:
        return Result(res.graph, recorded, None)
    whole = submodule.replaced(model, name, res.model)
    before = stats(model, inputs) if measure else None
    after = stats(whole, inputs) if measure else None
    return Result(res.graph, recorded, whole, before, after)


def plan(model: nn.Module, example_inputs, method: str = "l1", ratio: float = 0.5, data=None, *,
         loss: Callable | None = None, **options) -> Plan:
    """Trace ``model``, score its groups with ``method`` and return a :class:`~surgery.plan.Plan`.

    Options: ``policy`` (``"local"``/``"global"``), ``normalize``, ``layer_ratios``, ``round_to``,
    ``target_macs``, ``skip_cross_channel``, ``leaf_modules``, ``calib_batches``, ``only_layers``
    (patterns over the modules producing a group's channels: only those groups are scored and
    pruned; the layer-by-layer schedule uses it), ``weights`` (a ``.safetensors`` file or directory
    the weights of a model on the meta device are read from, one tensor at a time), and the method's
    own (``surgery methods NAME``). Unknown names are an error.

    Examples
    --------
    >>> import torch, surgery
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    >>> p = surgery.plan(net, torch.randn(1, 3, 16, 16), method="l1", ratio=0.5)
    >>> [len(g.keep) for g in p.groups]
    [4]
    >>> surgery.plan(net, torch.randn(1, 3, 16, 16), polcy="global")
    Traceback (most recent call last):
    ...
    surgery.errors.PlanError: unknown option 'polcy' for method 'l1' (did you mean 'policy'?); known options: ...
    """
    return run(model, example_inputs, method, ratio, data, mode=None, loss=loss, **options).plan


def prune(model: nn.Module, example_inputs, method: str = "l1", ratio: float = 0.5, data=None, *, mode: str = "prune",
          output: str = "auto", loss: Callable | None = None, **options) -> nn.Module:
    """Plan with ``method`` at ``ratio`` and return the pruned model (``model`` is not modified).

    Examples
    --------
    >>> import torch, surgery
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    >>> small = surgery.prune(net, torch.randn(1, 3, 16, 16), method="l1", ratio=0.5)
    >>> small(torch.randn(1, 3, 16, 16)).shape, net[0].out_channels, type(small).__name__, small[0]
    (torch.Size([1, 4, 12, 12]), 8, 'Sequential', Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1)))
    """
    if method == UNSTRUCTURED:
        if data is not None or loss is not None:
            raise PlanError(f"method {UNSTRUCTURED!r} needs no data or loss (it ranks weights by magnitude)")
        if mode not in MODES:
            raise PlanError(f"unknown mode {mode!r}; known modes: {', '.join(MODES)}")
        return run_unstructured(model, example_inputs, output=output, **options).model
    return run(model, example_inputs, method, ratio, data, mode=mode, output=output, loss=loss, **options).model


# -- unstructured: single weights, not channels (no graph, no plan) -------------------------------
@dataclass
class SparseResult:
    """What one unstructured run made: the model (dense shapes, zeros, masks attached) and its masks."""

    model: nn.Module
    masks: dict
    sparsity: float
    scope: str
    before: ModelStats | None = None
    after: ModelStats | None = None


def run_unstructured(model: nn.Module, example_inputs, sparsity=None, scope: str = "global", *, output: str = "auto",
                     measure: bool = False, progress: Callable[[str], None] | None = None, **options) -> SparseResult:
    """Magnitude-unstructured pruning (``method="magnitude-unstructured"``): zero the ``int(sparsity * n)``
    smallest-magnitude Linear/conv weights, over all of them (``scope="global"``) or per tensor
    (``"layer"``). Shapes stay; the result carries its masks (:func:`surgery.sparsity.masks_of`) for
    fine-tuning. ``output``: ``"auto"``/``"module"`` return the user's own class, ``"graph"`` a
    ``GraphModule``. This is not a channel method, so ``ratio`` and the planning options do not apply.

    >>> import torch, surgery
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    >>> sparse = surgery.prune(net, torch.randn(1, 3, 16, 16), method="magnitude-unstructured", sparsity=0.9)
    >>> sum(int((m.weight == 0).sum()) for m in (sparse[0], sparse[2])), 9 * (3 * 8 + 8 * 4)
    (453, 504)
    """
    if options:
        raise PlanError(f"option(s) {', '.join(sorted(options))} do not apply to method {UNSTRUCTURED!r}; "
                        f"its options: sparsity, scope")
    if sparsity is None:
        raise PlanError(f"method {UNSTRUCTURED!r} needs sparsity= (the share of weights set to zero, e.g. 0.9)")
    sparsity = check_sparsity(sparsity, scope)
    if output not in OUTPUTS:
        raise PlanError(f"unknown output {output!r}; known outputs: {', '.join(OUTPUTS)}")
    step = progress or _noop
    inputs = normalize_inputs(example_inputs)
    before = stats(model, inputs) if measure else None
    step(f"zeroing {sparsity:.0%} of the weights ({scope})")
    out = prune_unstructured(model, sparsity, scope)
    masks = masks_of(out)
    if output == "graph":
        from .dependency_graph.tracing import trace_module

        out = attach_masks(trace_module(out, inputs), masks)
    after = stats(out, inputs) if measure else None
    return SparseResult(out, masks, sparsity, scope, before, after)
