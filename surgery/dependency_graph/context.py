"""What an op rule sees: the node, its module, its argument values, and the space table."""

from __future__ import annotations

import numpy as np
import torch
import torch.fx
from torch import nn

from .arguments import MISSING, NodeArgs
from .reasons import Reason
from .spaces import SpaceTable

__all__ = ["BuildCtx", "RewriteCtx", "tensor_slots", "MISSING"]


def tensor_slots(value, path: tuple = ()):
    """Yield ``(path, tensor)`` for every tensor inside a (nested) tuple/list value."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from tensor_slots(v, path + (i,))


class BuildCtx:
    """Context handed to ``OpRule.couple``."""

    def __init__(self, table: SpaceTable, node: torch.fx.Node, module: nn.Module | None, aliases=()):
        self.table = table
        self.node = node
        self.module = module
        self.owner = node.target if node.op == "call_module" else ""
        self.args = NodeArgs(node, module, dict(aliases))

    # -- arguments ------------------------------------------------------------------------
    def arg(self, index: int | None, name: str | None = None, default=MISSING):
        """Argument ``name`` of the op (``index``: its position in the op's signature), passed by
        position or keyword; dims come back non-negative (see ``arguments.py``)."""
        return self.args.get(index, name, default)

    @property
    def input(self):
        """The op's first argument (``input`` / ``self`` / ``tensor``), however it was passed."""
        return self.args.get(0, "input", None)

    @staticmethod
    def val(x):
        """The (meta) value of an argument: a node's recorded value, or the constant itself."""
        if isinstance(x, torch.fx.Node):
            return x.meta.get("val")
        return x

    def is_tensor(self, x) -> bool:
        return isinstance(x, torch.fx.Node) and isinstance(x.meta.get("val"), torch.Tensor)

    def shape(self, x) -> tuple[int, ...]:
        return tuple(self.val(x).shape)

    def out_val(self, path: tuple = ()):
        v = self.node.meta.get("val")
        for p in path:
            v = v[p]
        return v

    # -- spaces ---------------------------------------------------------------------------
    def sp(self, x: torch.fx.Node, dim: int, path: tuple = ()) -> int:
        v = x.meta["val"]
        for p in path:
            v = v[p]
        nd = v.dim()
        return self.table.tensor(x.name, path, dim % nd if nd else 0)

    def out(self, dim: int, path: tuple = ()) -> int:
        return self.sp(self.node, dim, path)

    def p(self, name: str, dim: int) -> int:
        """Space of dimension ``dim`` of parameter/buffer ``name`` (dotted for submodules) of this node's module."""
        sub, _, leaf = name.rpartition(".")
        mod = self.module.get_submodule(sub) if sub else self.module
        tensor = getattr(mod, leaf, None)
        if not isinstance(tensor, torch.Tensor):
            raise KeyError(f"{self.owner} has no tensor {name}")
        owner = f"{self.owner}.{sub}" if sub else self.owner
        return self.table.param(owner, leaf, dim % tensor.dim(), tensor.shape[dim], tensor)

    def has(self, name: str) -> bool:
        if self.module is None:
            return False
        sub, _, leaf = name.rpartition(".")
        mod = self.module.get_submodule(sub) if sub else self.module
        return isinstance(getattr(mod, leaf, None), torch.Tensor)

    # -- coupling shortcuts ---------------------------------------------------------------
    def identity(self, a: int, b: int) -> None:
        self.table.identity(a, b)

    def same_dims(self, x: torch.fx.Node, dims=None, path: tuple = (), out_path: tuple = ()) -> None:
        """Couple dims of input ``x`` with the same dims of the output where sizes agree."""
        v = x.meta["val"]
        for p in path:
            v = v[p]
        o = self.out_val(out_path)
        if v.dim() != o.dim():
            return
        for d in range(v.dim()) if dims is None else dims:
            if v.shape[d] == o.shape[d]:
                self.table.identity(self.sp(x, d, path), self.out(d, out_path))

    def stop(self, sid: int, reason: Reason, detail: str = "") -> None:
        self.table.stop(sid, reason, detail)

    def cross(self, sid: int, detail: str) -> None:
        self.table.mark_cross_channel(sid, detail)

    def describe(self) -> str:
        if self.node.op == "call_module":
            return f"{type(self.module).__name__} ({self.node.target})"
        target = self.node.target
        return f"{getattr(target, '__name__', target)} ({self.node.name})"


class RewriteCtx:
    """Context handed to ``OpRule.rewrite`` / ``OpRule.fix``: sizes after pruning."""

    def __init__(self, graph, old_node: torch.fx.Node, new_node: torch.fx.Node, removed: np.ndarray):
        self.graph = graph  # DependencyGraph
        self.old = old_node
        self.node = new_node
        self._removed = removed
        self._old_args: NodeArgs | None = None

    @property
    def old_args(self) -> NodeArgs:
        if self._old_args is None:
            from .rules._registry import lookup  # rules import this module

            module = self.graph.root.get_submodule(self.old.target) if self.old.op == "call_module" else None
            rule = lookup(self.old, module)
            self._old_args = NodeArgs(self.old, module, dict(rule.aliases) if rule is not None else {})
        return self._old_args

    def kept(self, x: torch.fx.Node | str, dim: int, path: tuple = ()) -> np.ndarray:
        """Boolean mask of the entries of ``x``'s dim that survive."""
        name = x if isinstance(x, str) else x.name
        table = self.graph.table
        v = self.graph.gm_node(name).meta["val"]
        for p in path:
            v = v[p]
        return self.graph.space_kept(table.tensor(name, path, dim % max(v.dim(), 1)), self._removed)

    def new_size(self, x: torch.fx.Node | str, dim: int, path: tuple = ()) -> int:
        return int(self.kept(x, dim, path).sum())

    def old_arg(self, index: int | None, name: str | None = None, default=MISSING):
        """Argument of the node before pruning, read as ``BuildCtx.arg`` reads it."""
        return self.old_args.get(index, name, default)

    def set_arg(self, index: int | None, name: str | None, value) -> None:
        """Replace argument ``(index, name)`` of the new node where the call site passed it."""
        kind, where = self.old_args.slot(index, name)
        if kind == "arg":
            args = list(self.node.args)
            args[where] = value
            self.node.args = tuple(args)
        else:
            kwargs = dict(self.node.kwargs)
            kwargs[where] = value
            self.node.kwargs = kwargs
