"""Apply a plan: rebuild a smaller dense model (``prune``) or zero the removed slices (``mask``).

The rewrite works on a deep copy of the traced ``GraphModule``: every parameter dimension that lost
channels is sliced (or zeroed), each module's size attributes are fixed by its op rule, constants in
node arguments (reshape sizes, split sizes, normalized shapes, head counts) are recomputed, and the
graph is linted, recompiled and shape-checked on meta tensors. The user's model is never touched.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
import torch.fx
from torch import nn

from . import compensation, module_tree
from .compensation import owner_module
from ._provenance import remember_inputs
from .dependency_graph import DependencyGraph
from .dependency_graph import trace as trace_graph
from .dependency_graph.context import RewriteCtx
from .dependency_graph.rules import lookup
from .dependency_graph.tracing import propagate
from .errors import RewriteError, TraceError
from .plan import Plan

__all__ = ["apply", "apply_to_graph", "MODES", "OUTPUTS"]

MODES = ("prune", "mask")
OUTPUTS = ("auto", "module", "graph")


def _kept_dims(graph: DependencyGraph, removed: np.ndarray) -> dict[tuple[str, str], list[tuple[int, np.ndarray]]]:
    """``{(owner, tensor name): [(dim, kept mask), ...]}`` for every tensor that loses entries."""
    per_tensor: dict[tuple[str, str], list[tuple[int, np.ndarray]]] = {}
    for (owner, name, dim), sid in graph.table.param_spaces().items():
        kept = graph.space_kept(sid, removed)
        if not kept.all():
            per_tensor.setdefault((owner, name), []).append((dim, kept))
    return per_tensor


def _fold_tensor(t: torch.Tensor, member, keep: tuple[int, ...], fold: np.ndarray) -> torch.Tensor:
    """``t`` with the input slices of ``member`` rewritten: kept unit k <- sum_c fold[k, c] * slice c.

    A unit may own several indices (a flatten -> linear consumer owns H*W columns per channel);
    the j-th index of every unit lines up with the j-th of the others."""
    lists = member.index_map()
    present = [u for u in range(len(lists)) if lists[u]]
    if not present:
        return t
    width = len(lists[present[0]])
    if any(len(lists[u]) != width for u in present):
        raise RewriteError(f"cannot fold into {member.name}: its channels own different numbers of slices")
    moved = t.detach().movedim(member.dim, 0)
    block = moved[torch.tensor([lists[u] for u in present])].double()  # (units, width, ...)
    f = torch.from_numpy(fold[:, present])  # (kept, units)
    rows = torch.einsum("kp,pw...->kw...", f, block).to(t.dtype)
    out = moved.clone()
    for k, u in enumerate(keep):
        if u < len(lists) and lists[u]:
            out[torch.tensor(lists[u])] = rows[k]
    return out.movedim(0, member.dim).contiguous()


def _folded(graph: DependencyGraph, plan: Plan) -> tuple[dict[tuple[str, str], torch.Tensor], dict]:
    """``{(owner, name): folded copy}`` for every consumer weight of a group whose plan has a fold
    (and every existing bias a bias compensation changes), and ``{(owner, "bias"): NewBias}`` for
    the linears a compensation gives a bias (:mod:`surgery.compensation`)."""
    from .roles import consumers

    out: dict[tuple[str, str], torch.Tensor] = {}
    added: dict = {}
    for gp in plan.groups:
        if gp.shift:
            compensation.shift_biases(graph, gp, out, added)
        fold = gp.fold_matrix()
        if fold is None:
            continue
        done = set()  # a module called twice is one weight: fold it once
        for site, member in consumers(graph, graph.groups[gp.id]):
            key = (site.owner, site.weight)
            if key in done:
                continue
            done.add(key)
            base = out.get(key, getattr(owner_module(graph.root, site.owner), site.weight))
            out[key] = _fold_tensor(base, member, gp.keep, fold)
    return out, added


def _sliced_copies(gm: nn.Module, per_tensor, folded) -> dict[int, torch.Tensor]:
    """Deep-copy memo: each tensor that loses entries (or is folded) maps to its new copy (the
    original is never copied whole)."""
    memo: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for key in {**per_tensor, **folded}:
            owner, name = key
            old = getattr(owner_module(gm, owner), name)
            new = folded.get(key, old.detach())
            for dim, kept in per_tensor.get(key, ()):
                new = new.index_select(dim, torch.from_numpy(np.flatnonzero(kept)))
            new = new.clone()
            memo[id(old)] = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
    return memo


def _zero_removed(gm: nn.Module, per_tensor, folded) -> None:
    """Mask mode: write folded consumer weights, then zero each removed slice of every parameter
    (buffers are statistics, left as is)."""
    with torch.no_grad():
        for (owner, name), value in folded.items():
            getattr(owner_module(gm, owner), name).copy_(value)
        for (owner, name), dims in per_tensor.items():
            t = getattr(owner_module(gm, owner), name)
            if isinstance(t, nn.Parameter):
                for dim, kept in dims:
                    t.index_fill_(dim, torch.from_numpy(np.flatnonzero(~kept)), 0.0)


def _changed(graph: DependencyGraph, node: torch.fx.Node, removed: np.ndarray) -> bool:
    """Whether any tensor dim the node reads or writes lost entries."""
    spaces = graph.table.node_spaces
    return any(
        not graph.space_kept(sid, removed).all() for n in (node, *node.all_input_nodes) for sid in spaces.get(n.name, ())
    )


def _rewrite_nodes(gm: torch.fx.GraphModule, graph: DependencyGraph, removed: np.ndarray, owners: set[str]) -> None:
    """Run each changed node's rewrite hook (functions) or fix hook (modules: also when only the
    module's own parameters changed, e.g. a leaf with an internal width); ``owners`` are the
    modules whose tensors lost entries."""
    new_nodes = {n.name: n for n in gm.graph.nodes}
    fixed: set[str] = set()
    for old in graph.fx_graph.nodes:
        if old.op not in ("call_module", "call_function", "call_method"):
            continue
        module = graph.root.get_submodule(old.target) if old.op == "call_module" else None
        rule = lookup(old, module)
        if rule is None:
            continue
        own = old.op == "call_module" and any(o == old.target or o.startswith(old.target + ".") for o in owners)
        if not own and not _changed(graph, old, removed):
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


def _graph_result(graph: DependencyGraph, plan: Plan, mode: str, removed, per_tensor, folded,
                  added: dict | None = None, biases: dict | None = None) -> torch.fx.GraphModule:
    if mode == "mask":
        gm = copy.deepcopy(graph.gm)
        _zero_removed(gm, per_tensor, folded)
        if added:
            compensation.install_graph(gm, added, biases)
            gm.graph.lint()
            gm.recompile()
    else:
        gm = copy.deepcopy(graph.gm, _sliced_copies(graph.root, per_tensor, folded))
        _rewrite_nodes(gm, graph, removed, {owner for owner, _ in per_tensor})
        if added:
            compensation.install_graph(gm, added, biases)
        gm.graph.lint()
        gm.recompile()
        try:
            propagate(gm, gm.graph, graph.example_inputs)
        except TraceError as exc:
            raise RewriteError(f"pruned model is inconsistent: {exc}") from exc
    gm.meta["surgery_plan"] = plan.to_dict()
    return gm


def apply_to_graph(graph: DependencyGraph, plan: Plan, mode: str = "prune", output: str = "graph",
                   model: nn.Module | None = None, graph_result: torch.fx.GraphModule | None = None) -> nn.Module:
    """Apply ``plan`` to the model traced in ``graph``.

    ``output="graph"`` returns a ``GraphModule``; ``"module"`` a copy of ``model`` (the user's own
    class; for the fx front end ``graph.root`` is that model) with the new widths, or a
    :class:`RewriteError` saying why it cannot be; ``"auto"`` the module when it computes what the
    graph result computes, else the ``GraphModule`` with the reason in ``meta["surgery_output"]``
    (and a warning). ``graph_result`` is a ``GraphModule`` already made for this plan and mode.
    """
    if mode not in MODES:
        raise RewriteError(f"unknown mode {mode!r}; known modes: {', '.join(MODES)}")
    if output not in OUTPUTS:
        raise RewriteError(f"unknown output {output!r}; known outputs: {', '.join(OUTPUTS)}")
    plan.check_fits(graph)
    removed = graph.removed_components(plan.removed_units())
    per_tensor = _kept_dims(graph, removed)
    folded, added = _folded(graph, plan)
    if mode == "mask":  # slices a rule exempts from zeroing (a weight norm's v) stay as they are
        exempt = graph.table.mask_exempt
        per_tensor = {k: [(d, kept) for d, kept in dims if (*k, d) not in exempt] for k, dims in per_tensor.items()}
    biases = compensation.bias_values(added, per_tensor, mode)
    if model is None and graph.frontend == "fx":
        model = graph.root
    why = "the model the graph was traced from is not available"
    if output != "graph" and model is not None and mode == "mask":
        out = copy.deepcopy(model)
        _zero_removed(out, per_tensor, folded)
        why = compensation.install_module(out, biases)
        if not why:
            remember_inputs(out, graph.example_inputs)
            return out
    if graph_result is not None:
        gm = graph_result
    else:
        gm = _graph_result(graph, plan, mode, removed, per_tensor, folded, added, biases)
    if output == "graph":
        return gm
    if isinstance(model, torch.fx.GraphModule) and graph.frontend == "fx":
        return gm  # the model is a graph (imported from Caffe or ONNX): its rewritten graph is its own kind
    if model is not None and mode == "prune":
        candidate, why = module_tree.build(model, graph, removed, per_tensor, folded, _sliced_copies, gm, biases)
        if candidate is not None:
            why = module_tree.check(candidate, gm, graph.example_inputs)
            if not why:
                remember_inputs(candidate, graph.example_inputs)  # surgery.save(candidate, path) needs no inputs
                return candidate
    if output == "module":
        raise RewriteError(f"cannot return the model's own class: {why}")
    warnings.warn(f"surgery returns a GraphModule: {why}", stacklevel=2)
    gm.meta["surgery_output"] = {"output": "graph", "reason": why}
    return gm


def apply(model: nn.Module, plan: Plan, mode: str = "prune", output: str = "auto") -> nn.Module:
    """Return a new module with ``plan`` applied; ``model`` is left untouched.

    ``mode="prune"`` rebuilds layers with fewer channels; ``mode="mask"`` keeps every shape and zeroes
    each parameter slice of the removed channels. For groups without a cross-channel statistic both
    give the same outputs. ``output``: ``"auto"`` (the model's own class where its forward allows,
    else a ``GraphModule``, saying why), ``"module"`` or ``"graph"``.
    """
    if mode not in MODES:
        raise RewriteError(f"unknown mode {mode!r}; known modes: {', '.join(MODES)}")
    name = plan.options.get("submodule", "")
    if name:  # a plan made for one submodule: apply it there, return the whole model
        from . import submodule

        part = submodule.get(model, name)
        graph = trace_graph(part, plan.example_inputs(), plan.leaf_modules, plan.options.get("free_outputs", ()))
        return submodule.replaced(model, name, apply_to_graph(graph, plan, mode, output, part))
    graph = trace_graph(model, plan.example_inputs(), plan.leaf_modules, plan.options.get("free_outputs", ()))
    return apply_to_graph(graph, plan, mode, output, model)
