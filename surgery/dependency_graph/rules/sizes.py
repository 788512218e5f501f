"""Where the sizes in a reshape come from: ``y.size()`` reads, tuple slices and constants.

``x.size()`` / ``x.shape`` / ``x.size(d)`` record the space each int was read from
(``SpaceTable.int_source``); indexing and slicing the tuple, and concatenating it with a literal
tuple (the Hugging Face attention idiom ``q.view(q.size()[:-1] + (heads, head_dim))``), keep one
entry per int: a space id (the int is read at run time, so it follows pruning by itself) or a
:class:`Literal` (a constant that the rewrite must recompute). A reshape then knows, for each output
dim, what sizes it:

* a space: the output dim must keep as many entries as that space (a size constraint);
* a literal: the rewrite writes the dim's new size into the node that holds the constant; every
  reshape that reads the same constant must keep the same count (a size constraint between them);
* a shape tuple whose origin is not followed: the output dims are stopped (the rewrite could not
  recompute them).
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass

import torch
import torch.fx

from ..context import BuildCtx, RewriteCtx
from ..reasons import Reason
from .common import op_name

__all__ = ["Literal", "size_tuple_arith", "couple_size_reads", "rewrite_packed_shape", "packed_shape_node"]

#: ops that consume a shape tuple and recompute its literals through ``rewrite_packed_shape``
SHAPE_CONSUMERS = frozenset({"view", "reshape", "expand"})


@dataclass(frozen=True)
class Literal:
    """The constant ``node.args[arg][pos]`` (``value``) of fx node ``node``, used as a size."""

    node: str
    arg: int
    pos: int
    value: int


def _entries_of(ctx: BuildCtx, x, arg: int):
    """Size entries of one operand of a tuple concatenation, or None when not followed."""
    if isinstance(x, torch.fx.Node):
        src = ctx.table.int_source.get(x.name)
        return src if isinstance(src, tuple) else None
    if not isinstance(x, (tuple, list)):
        return None
    out = []
    for j, v in enumerate(x):
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            out.append(Literal(ctx.node.name, arg, j, v))
        elif isinstance(v, torch.fx.Node):
            src = ctx.table.int_source.get(v.name)
            out.append(src if isinstance(src, int) else None)  # None: an int computed at run time
        else:
            return None
    return tuple(out)


def size_tuple_arith(ctx: BuildCtx) -> None:
    """``size_tuple + (literal, ...)``: the result's entries are the operands' entries, in order."""
    if ctx.node.target not in (operator.add, operator.iadd) or not isinstance(ctx.out_val(), (tuple, list)):
        return
    a, b = ctx.node.args[:2]
    ea, eb = _entries_of(ctx, a, 0), _entries_of(ctx, b, 1)
    if ea is not None and eb is not None:
        ctx.table.int_source[ctx.node.name] = ea + eb


def packed_shape_node(node: torch.fx.Node, values: list) -> torch.fx.Node | None:
    """The node that holds a whole shape tuple (``x.view(shape)``), or None for explicit sizes."""
    if len(values) == 1 and isinstance(values[0], torch.fx.Node):
        v = values[0].meta.get("val")
        if isinstance(v, (tuple, list)):
            return values[0]
    return None


def _holder(start: torch.fx.Node, name: str) -> torch.fx.Node | None:
    """The ancestor of ``start`` called ``name``, searched through non-tensor nodes only."""
    seen, todo = set(), deque([start])
    while todo:
        n = todo.popleft()
        if n.name == name:
            return n
        for a in n.all_input_nodes:
            if a not in seen and not isinstance(a.meta.get("val"), torch.Tensor):
                seen.add(a)
                todo.append(a)
    return None


def _only_feeds_shapes(node: torch.fx.Node) -> bool:
    """Whether every use of ``node``'s value ends in a reshape that recomputes its literals."""
    seen, todo = set(), deque([node])
    while todo:
        n = todo.popleft()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            if isinstance(user.meta.get("val"), (tuple, list)) and user.target in (operator.add, operator.getitem):
                todo.append(user)
            elif op_name(user.target) not in SHAPE_CONSUMERS:
                return False
    return True


def couple_size_reads(ctx: BuildCtx, values: list) -> None:
    """Size constraints for output dims sized by ``y.size(d)`` or by a literal inside a shape tuple.

    ``values`` are the reshape's size arguments (explicit sizes, or one node holding the tuple).
    """
    out = ctx.out_val()
    table = ctx.table
    packed = packed_shape_node(ctx.node, values)
    if packed is not None:
        entries = table.int_source.get(packed.name)
        ok = isinstance(entries, tuple) and len(entries) == out.dim()
        if ok:
            holders = {e.node for e in entries if isinstance(e, Literal)}
            ok = all((h := _holder(packed, name)) is not None and _only_feeds_shapes(h) for name in holders)
        if not ok:
            why = f"{ctx.describe()}: shape tuple {packed.name} has sizes the rewrite cannot recompute"
            for d in range(out.dim()):
                ctx.stop(ctx.out(d), Reason.FIXED_DIM, why)
            return
    else:
        if len(values) != out.dim():
            return
        entries = [table.int_source.get(v.name) if isinstance(v, torch.fx.Node) else None for v in values]
    for d, e in enumerate(entries):
        if isinstance(e, bool):
            continue
        if isinstance(e, int) and table.spaces[e].size == out.shape[d]:
            table.size_constraints.append((e, ctx.out(d)))
            table.touch(ctx.out(d))
        elif isinstance(e, Literal) and e.value != -1:
            first = table.literal_dims.setdefault((e.node, e.arg, e.pos), ctx.out(d))
            if first != ctx.out(d):
                table.size_constraints.append((first, ctx.out(d)))


def rewrite_packed_shape(ctx: RewriteCtx, shape: torch.fx.Node) -> None:
    """Write each literal of the shape tuple ``shape`` (old graph) back with its dim's new size."""
    entries = ctx.graph.table.int_source.get(shape.name)
    if not isinstance(entries, tuple):
        return
    for d, e in enumerate(entries):
        if not isinstance(e, Literal) or e.value == -1:
            continue
        holder = _holder(ctx.node, e.node)
        if holder is None:
            raise KeyError(f"shape constant holder {e.node} not found above {ctx.node.name}")
        args = list(holder.args)
        seq = list(args[e.arg])
        seq[e.pos] = ctx.new_size(ctx.old, d)
        args[e.arg] = type(args[e.arg])(seq)
        holder.args = tuple(args)
