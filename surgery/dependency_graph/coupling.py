"""One node of the fx graph -> its spaces and couplings (the op rule's job, with the safe defaults).

Every tensor a node produces gets its spaces; model inputs and outputs are stopped; ``get_attr``
tensors are tied to their parameters; any other node is handed to its op rule. Whatever the rule
leaves unexplained is stopped, and so is everything a rule touched when it raises.
"""

from __future__ import annotations

import fnmatch

import operator

import torch
import torch.fx
from torch import nn

from . import rules  # noqa: F401  (registers every op rule)
from .context import BuildCtx, tensor_slots
from .reasons import Reason
from .rules._registry import lookup
from .spaces import SpaceTable

__all__ = ["couple_node"]


def _input_nodes(node: torch.fx.Node) -> list[torch.fx.Node]:
    seen: dict[torch.fx.Node, None] = {}
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: seen.setdefault(n))
    return list(seen)


def _slot_spaces(table: SpaceTable, node: torch.fx.Node) -> list[int]:
    return table.node_spaces[node.name]  # nodes are registered in graph order, before any user


def _read_spaces(table: SpaceTable, node: torch.fx.Node, arg: torch.fx.Node) -> list[int]:
    """Spaces of ``arg`` that ``node`` reads: only the selected element for ``tuple_value[i]``."""
    if node.target is operator.getitem and node.args[0] is arg and isinstance(node.args[1], int):
        value = arg.meta.get("val")
        if isinstance(value, (tuple, list)) and -len(value) <= node.args[1] < len(value):
            i = node.args[1] % len(value)
            return [table.tensor(arg.name, (i,) + p, d) for p, t in tensor_slots(value[i]) for d in range(t.dim())]
    return _slot_spaces(table, arg)


def _register_outputs(table: SpaceTable, node: torch.fx.Node) -> None:
    table.node_spaces[node.name] = [
        table.tensor(node.name, path, d, t.shape[d]) for path, t in tensor_slots(node.meta.get("val")) for d in range(t.dim())
    ]


def _owner_and_name(target: str) -> tuple[str, str]:
    owner, _, name = target.rpartition(".")
    return owner, name


def _free_output(table: SpaceTable, node: torch.fx.Node) -> bool:
    """Whether the output ``node`` matches a ``free_outputs`` pattern (its module's name or its node
    name): its channels may shrink instead of being held by the model's output."""
    names = [node.name] + ([node.target] if node.op == "call_module" else [])
    return any(fnmatch.fnmatchcase(n, pattern) for pattern in table.free_outputs for n in names)


def couple_node(table: SpaceTable, gm: nn.Module, node: torch.fx.Node) -> None:
    _register_outputs(table, node)
    if node.op == "placeholder":
        for sid in _slot_spaces(table, node):
            table.stop(sid, Reason.MODEL_INPUT, node.name)
        return
    if node.op == "output":
        for arg in _input_nodes(node):
            if _free_output(table, arg):
                continue
            for sid in _slot_spaces(table, arg):
                table.stop(sid, Reason.MODEL_OUTPUT, arg.name)
        return
    if node.op == "get_attr":
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            owner, name = _owner_and_name(node.target)
            real = getattr(gm.get_submodule(owner) if owner else gm, name, None)
            for d in range(value.dim()):
                table.identity(table.tensor(node.name, (), d), table.param(owner, name, d, value.shape[d], real))
        return
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    rule = lookup(node, module)
    ins = [sid for arg in _input_nodes(node) for sid in _read_spaces(table, node, arg)]
    outs = _slot_spaces(table, node)
    if rule is None:
        what = type(module).__name__ if module is not None else getattr(node.target, "__name__", str(node.target))
        for sid in ins + outs:
            table.stop(sid, Reason.UNSUPPORTED_OP, f"{what} ({node.name})")
        return
    table.touched = set()
    ctx = BuildCtx(table, node, module, rule.aliases)
    try:
        rule.couple(ctx)
    except Exception as exc:  # noqa: BLE001  (a rule that cannot explain its node stops it; the trace goes on)
        _stop_failed_node(table, node, module, ins + outs, exc)
        return
    touched = table.touched
    for sid in ins:
        if sid not in touched:
            table.stop(sid, Reason.FIXED_DIM, ctx.describe())
    for sid in outs:
        if sid not in touched:
            table.stop(sid, Reason.NOT_PRODUCED, ctx.describe())


def _stop_failed_node(table: SpaceTable, node: torch.fx.Node, module: nn.Module | None, spaces: list[int],
                      exc: Exception) -> None:
    """Stop every space a failed rule could have coupled: the node's inputs and outputs, the spaces
    the rule touched before raising, and every dim of the module's own tensors. Couplings the rule
    made before raising only join atoms of these spaces, so stops (which win) cover them."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    detail = f"{node.format_node()}: rule raised {type(exc).__name__}" + (f": {first}" if first else "")
    table.int_source.pop(node.name, None)
    spaces = list(spaces) + sorted(table.touched)
    if module is not None:
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            sub, _, leaf = name.rpartition(".")
            owner = f"{node.target}.{sub}" if sub else node.target
            spaces += [table.param(owner, leaf, d, t.shape[d], t) for d in range(t.dim())]
    for sid in spaces:
        table.stop(sid, Reason.UNSUPPORTED_OP, detail)
