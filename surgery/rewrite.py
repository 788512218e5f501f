"""Apply a plan: rebuild a smaller dense model (``prune``) or zero the removed slices (``mask``).

The rewrite works on a deep copy of the traced ``GraphModule``: every parameter dimension that lost
channels is sliced (or zeroed), each module's size attributes are fixed by its op rule, constants in
node arguments (reshape sizes, split sizes, normalized shapes, head counts) are recomputed, and the
graph is linted, recompiled and shape-checked on meta tensors. The user's model is never touched.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.fx
from torch import nn

from .dependency_graph import DependencyGraph
from .dependency_graph import trace as trace_graph
from .dependency_graph.context import RewriteCtx
from .dependency_graph.rules import lookup
from .dependency_graph.tracing import propagate
from .errors import RewriteError, TraceError
from .plan import Plan

__all__ = ["apply", "apply_to_graph", "MODES"]

MODES = ("prune", "mask")


def _owner(gm: nn.Module, owner: str) -> nn.Module:
    return gm.get_submodule(owner) if owner else gm


def _kept_dims(graph: DependencyGraph, removed: np.ndarray) -> dict[tuple[str, str], list[tuple[int, np.ndarray]]]:
    """``{(owner, tensor name): [(dim, kept mask), ...]}`` for every tensor that loses entries."""
    per_tensor: dict[tuple[str, str], list[tuple[int, np.ndarray]]] = {}
    for (owner, name, dim), sid in graph.table.param_spaces().items():
        kept = graph.space_kept(sid, removed)
        if not kept.all():
            per_tensor.setdefault((owner, name), []).append((dim, kept))
    return per_tensor


def _sliced_copies(gm: nn.Module, per_tensor) -> dict[int, torch.Tensor]:
    """Deep-copy memo: each tensor that loses entries maps to its sliced copy (never copied whole)."""
    memo: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for (owner, name), dims in per_tensor.items():
            old = getattr(_owner(gm, owner), name)
            new = old.detach()
            for dim, kept in dims:
                new = new.index_select(dim, torch.from_numpy(np.flatnonzero(kept)))
            new = new.clone()
            memo[id(old)] = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
    return memo


def _zero_removed(gm: nn.Module, per_tensor) -> None:
    """Mask mode: zero each removed slice of every parameter (buffers are statistics, left as is)."""
    with torch.no_grad():
        for (owner, name), dims in per_tensor.items():
            t = getattr(_owner(gm, owner), name)
            if isinstance(t, nn.Parameter):
                for dim, kept in dims:
                    t.index_fill_(dim, torch.from_numpy(np.flatnonzero(~kept)), 0.0)


def _changed(graph: DependencyGraph, node: torch.fx.Node, removed: np.ndarray) -> bool:
    """Whether any tensor dim the node reads or writes lost entries."""
    spaces = graph.table.node_spaces
    return any(
        not graph.space_kept(sid, removed).all() for n in (node, *node.all_input_nodes) for sid in spaces.get(n.name, ())
    )


def _rewrite_nodes(gm: torch.fx.GraphModule, graph: DependencyGraph, removed: np.ndarray) -> None:
    new_nodes = {n.name: n for n in gm.graph.nodes}
    fixed: set[str] = set()
    for old in graph.fx_graph.nodes:
        if old.op not in ("call_module", "call_function", "call_method"):
            continue
        module = graph.root.get_submodule(old.target) if old.op == "call_module" else None
        rule = lookup(old, module)
        if rule is None or (old.op != "call_module" and not _changed(graph, old, removed)):
            continue
        ctx = RewriteCtx(graph, old, new_nodes[old.name], removed)
        try:
            if old.op == "call_module" and rule.fix is not None and old.target not in fixed:
                fixed.add(old.target)
                rule.fix(gm.get_submodule(old.target), ctx)
            elif old.op != "call_module" and rule.rewrite is not None:
                rule.rewrite(ctx)
        except Exception as exc:
            raise RewriteError(f"cannot rewrite {old.format_node()}: {exc}".splitlines()[0]) from exc


def apply_to_graph(graph: DependencyGraph, plan: Plan, mode: str = "prune") -> torch.fx.GraphModule:
    """Apply ``plan`` to the model traced in ``graph``; returns a new ``GraphModule``."""
    if mode not in MODES:
        raise RewriteError(f"unknown mode {mode!r}; known modes: {', '.join(MODES)}")
    plan.check_fits(graph)
    removed = graph.removed_components(plan.removed_units())
    per_tensor = _kept_dims(graph, removed)
    if mode == "mask":
        gm = copy.deepcopy(graph.gm)
        _zero_removed(gm, per_tensor)
    else:
        gm = copy.deepcopy(graph.gm, _sliced_copies(graph.root, per_tensor))
    if mode == "prune":
        _rewrite_nodes(gm, graph, removed)
        gm.graph.lint()
        gm.recompile()
        try:
            propagate(gm, gm.graph, graph.example_inputs)
        except TraceError as exc:
            raise RewriteError(f"pruned model is inconsistent: {exc}") from exc
    gm.meta["surgery_plan"] = plan.to_dict()
    return gm


def apply(model: nn.Module, plan: Plan, mode: str = "prune") -> torch.fx.GraphModule:
    """Return a new module with ``plan`` applied; ``model`` is left untouched.

    ``mode="prune"`` rebuilds layers with fewer channels; ``mode="mask"`` keeps every shape and zeroes
    each parameter slice of the removed channels. For groups without a cross-channel statistic both
    give the same outputs.
    """
    if mode not in MODES:
        raise RewriteError(f"unknown mode {mode!r}; known modes: {', '.join(MODES)}")
    graph = trace_graph(model, plan.example_inputs(), plan.leaf_modules)
    return apply_to_graph(graph, plan, mode)
