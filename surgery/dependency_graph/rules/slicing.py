"""Ops that place channels at offsets along one dim: cat/stack, the split family, indexing."""

from __future__ import annotations

import operator

import torch
import torch.fx

from ..context import BuildCtx, RewriteCtx, tensor_slots
from ._registry import function_rule, method_rule


# -- cat / stack ----------------------------------------------------------------------------


def _tensor_list(ctx: BuildCtx, seq) -> list[torch.fx.Node] | None:
    if isinstance(seq, torch.fx.Node):
        return None  # a whole tuple-valued node: positions are unknown here
    items = list(seq)
    if not all(ctx.is_tensor(t) for t in items):
        return None
    return items


@function_rule(torch.cat, torch.concat, torch.concatenate)
def cat(ctx: BuildCtx) -> None:
    items = _tensor_list(ctx, ctx.arg(0, "tensors"))
    if not items:
        return
    out = ctx.out_val()
    dim = ctx.arg(1, "dim", 0)
    start = 0
    for t in items:
        v = t.meta["val"]
        if v.dim() != out.dim():
            return
        for d in range(out.dim()):
            if d == dim:
                ctx.table.offset(ctx.sp(t, d), ctx.out(d), start)
            elif v.shape[d] == out.shape[d]:
                ctx.identity(ctx.sp(t, d), ctx.out(d))
        start += v.shape[dim]


@function_rule(torch.stack)
def stack(ctx: BuildCtx) -> None:
    items = _tensor_list(ctx, ctx.arg(0, "tensors"))
    if not items:
        return
    dim = ctx.arg(1, "dim", 0)
    for t in items:
        for d in range(t.meta["val"].dim()):
            ctx.identity(ctx.sp(t, d), ctx.out(d if d < dim else d + 1))


# -- split family -------------------------------------------------------------------------


def _split_parts(ctx: BuildCtx, x, dim: int) -> None:
    out = ctx.out_val()
    start = 0
    nd = x.meta["val"].dim()
    for i, part in enumerate(out):
        if not isinstance(part, torch.Tensor) or part.dim() != nd:
            return
        for d in range(nd):
            if d == dim:
                ctx.table.offset(ctx.out(d, (i,)), ctx.sp(x, d), start)
            else:
                ctx.identity(ctx.sp(x, d), ctx.out(d, (i,)))
        start += part.shape[dim]


def _new_part_sizes(ctx: RewriteCtx, dim: int) -> list[int]:
    return [ctx.new_size(ctx.old, dim, (i,)) for i in range(len(ctx.old.meta["val"]))]


def _rewrite_split(ctx: RewriteCtx) -> None:
    dim = ctx.old_arg(2, "dim", 0)
    ctx.set_arg(1, None, _new_part_sizes(ctx, dim))


def _rewrite_chunk_like(ctx: RewriteCtx) -> None:
    """chunk/tensor_split may give unequal parts after pruning: become ``torch.split(sizes)``."""
    dim = ctx.old_arg(2, "dim", 0)
    sizes = _new_part_sizes(ctx, dim)
    kind, where = ctx.old_args.slot(0, "input")
    x = ctx.node.args[where] if kind == "arg" else ctx.node.kwargs[where]
    ctx.node.op = "call_function"
    ctx.node.target = torch.split
    ctx.node.args = (x, sizes, dim)
    ctx.node.kwargs = {}


@function_rule(torch.split, rewrite=_rewrite_split)
@method_rule("split", rewrite=_rewrite_split)
def split(ctx: BuildCtx) -> None:
    x = ctx.input
    if ctx.is_tensor(x):
        _split_parts(ctx, x, ctx.arg(2, "dim", 0))


@function_rule(torch.chunk, torch.tensor_split, rewrite=_rewrite_chunk_like)
@method_rule("chunk", "tensor_split", rewrite=_rewrite_chunk_like)
def chunk(ctx: BuildCtx) -> None:
    """``chunk(n)``, ``tensor_split(n)`` and ``tensor_split(indices=[...])``: parts at offsets."""
    x, parts = ctx.input, ctx.arg(1, None)
    constant = isinstance(parts, int) or (
        isinstance(parts, (list, tuple)) and all(isinstance(i, int) for i in parts)
    )
    if ctx.is_tensor(x) and constant:
        _split_parts(ctx, x, ctx.arg(2, "dim", 0))


@function_rule(torch.unbind)
@method_rule("unbind")
def unbind(ctx: BuildCtx) -> None:
    x = ctx.input
    if not ctx.is_tensor(x):
        return
    nd = ctx.val(x).dim()
    dim = ctx.arg(1, "dim", 0)
    for i in range(len(ctx.out_val())):
        for d in range(nd):
            if d != dim:
                ctx.identity(ctx.sp(x, d), ctx.out(d if d < dim else d - 1, (i,)))


@function_rule(torch.select)
@method_rule("select")
def select(ctx: BuildCtx) -> None:
    """``x.select(dim, i)`` drops ``dim`` (which stays whole, as for ``x[:, i]``); the rest pass through."""
    x = ctx.input
    dim = ctx.arg(1, "dim")
    if not ctx.is_tensor(x) or not isinstance(dim, int):
        return
    for d in range(ctx.val(x).dim()):
        if d != dim:
            ctx.identity(ctx.sp(x, d), ctx.out(d if d < dim else d - 1))


# -- indexing -------------------------------------------------------------------------------


def _index_plan(ctx_val, index) -> list[tuple] | None:
    """Per index item: ('slice', in_dim, out_dim, slice) | ('int', in_dim) | ('new', out_dim) |
    ('tensor', in_dim, node) for an integer index tensor (advanced indexing: ``out_dim`` of the
    slices is then not where they land, see ``_couple_advanced``)."""
    items = list(index) if isinstance(index, tuple) else [index]
    consuming = sum(1 for it in items if it is not None and it is not Ellipsis)
    nd = ctx_val.dim()
    plan, i, o = [], 0, 0
    for it in items:
        if it is Ellipsis:
            for _ in range(nd - consuming):
                plan.append(("slice", i, o, slice(None)))
                i += 1
                o += 1
        elif it is None:
            plan.append(("new", o))
            o += 1
        elif isinstance(it, slice):
            plan.append(("slice", i, o, it))
            i += 1
            o += 1
        elif isinstance(it, int):
            plan.append(("int", i))
            i += 1
        elif _index_tensor(it):
            plan.append(("tensor", i, it))
            i += 1
        else:
            return None  # bool masks, lists, ints computed at run time: stopped
    while i < nd:
        plan.append(("slice", i, o, slice(None)))
        i += 1
        o += 1
    return plan


def _const_slice(s: slice, size: int) -> tuple[int, int] | None:
    if any(isinstance(v, torch.fx.Node) for v in (s.start, s.stop, s.step)):
        return None
    if s.step not in (None, 1):
        return None
    start, stop, _ = s.indices(size)
    return start, max(start, stop)


def _rewrite_getitem(ctx: RewriteCtx) -> None:
    src = ctx.old.args[0]
    if not isinstance(src.meta.get("val"), torch.Tensor):
        return
    plan = _index_plan(src.meta["val"], ctx.old.args[1])
    if plan is None:
        return
    items = list(ctx.node.args[1]) if isinstance(ctx.node.args[1], tuple) else [ctx.node.args[1]]
    changed = False
    for k, step in enumerate(plan):
        if step[0] != "slice" or step[3] == slice(None):
            continue
        _, d, _, s = step
        kept = ctx.kept(src, d)
        bounds = _const_slice(s, kept.size)
        if bounds is None:
            continue
        new = slice(int(kept[: bounds[0]].sum()), int(kept[: bounds[1]].sum()))
        # find the item in the original index list that produced this plan step
        pos = _item_position(ctx.old.args[1], k, src.meta["val"].dim())
        if pos is not None and items[pos] != new:
            items[pos] = new
            changed = True
    if changed:
        ctx.set_arg(1, None, tuple(items) if isinstance(ctx.node.args[1], tuple) else items[0])


def _item_position(index, plan_pos: int, nd: int) -> int | None:
    items = list(index) if isinstance(index, tuple) else [index]
    consuming = sum(1 for it in items if it is not None and it is not Ellipsis)
    k = 0
    for pos, it in enumerate(items):
        width = nd - consuming if it is Ellipsis else 1
        if plan_pos < k + width:
            return None if it is Ellipsis else pos
        k += width
    return None


@function_rule(operator.getitem, rewrite=_rewrite_getitem)
def getitem(ctx: BuildCtx) -> None:
    src, index = ctx.node.args[0], ctx.node.args[1]
    value = ctx.val(src)
    ints = ctx.table.int_source.get(src.name) if isinstance(src, torch.fx.Node) else None
    if isinstance(ints, tuple) and isinstance(index, (int, slice)):
        ctx.table.int_source[ctx.node.name] = ints[index]  # one entry, or a slice of the size tuple
        return
    if isinstance(value, (tuple, list)):
        if isinstance(index, int) and -len(value) <= index < len(value):
            index %= len(value)  # spaces are keyed by the non-negative position
            for path, t in tensor_slots(ctx.out_val()):
                for d in range(t.dim()):
                    ctx.identity(ctx.sp(src, d, (index,) + path), ctx.out(d, path))
        return
    if not isinstance(value, torch.Tensor):
        return
    plan = _index_plan(value, index)
    if plan is None:
        return
    if any(step[0] == "tensor" for step in plan):
        # torch applies ints (select) and None (unsqueeze) first, then the index tensors
        inter = [("src", s[1], s[3]) if s[0] == "slice" else ("new",) if s[0] == "new" else ("idx", s[2])
                 for s in plan if s[0] != "int"]
        _couple_advanced(ctx, src, inter)
        return
    for step in plan:
        if step[0] != "slice":
            continue
        _, d, o, s = step
        if s == slice(None):
            ctx.identity(ctx.sp(src, d), ctx.out(o))
            continue
        bounds = _const_slice(s, value.shape[d])
        if bounds is not None and bounds[1] > bounds[0]:
            ctx.table.offset(ctx.out(o), ctx.sp(src, d), bounds[0])


# -- advanced indexing: index tensors ------------------------------------------------------


def _index_tensor(x) -> bool:
    """An integer index tensor (bool masks select a data-dependent number of entries: not here)."""
    v = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    return isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and v.dtype not in (torch.bool, torch.uint8)


def _couple_advanced(ctx: BuildCtx, src: torch.fx.Node, inter: list[tuple]) -> None:
    """Index tensors on the dims of ``inter`` (``('src', dim, slice)`` | ``('new',)`` | ``('idx', node)``).

    The dims indexed by tensors are consumed (stopped); their broadcast shape takes the place of the
    first of them when they are adjacent, else goes first (numpy's rule, which torch follows); every
    other dim passes through (a constant slice at its offset). Index tensors' own dims are coupled
    with the broadcast dims where sizes agree. Where the predicted output shape is not the recorded
    one, nothing is coupled.
    """
    value, out = ctx.val(src), ctx.out_val()
    if not isinstance(out, torch.Tensor):
        return
    taken = [k for k, e in enumerate(inter) if e[0] == "idx"]
    shapes = [tuple(ctx.shape(inter[k][1])) for k in taken]
    try:
        bshape = tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        return
    rest = [e for e in inter if e[0] != "idx"]
    adjacent = taken == list(range(taken[0], taken[-1] + 1))
    before = sum(1 for e in inter[: taken[0]] if e[0] != "idx") if adjacent else 0
    layout = rest[:before] + [("bcast", j) for j in range(len(bshape))] + rest[before:]
    if len(layout) != out.dim():
        return
    couplings = []
    for o, e in enumerate(layout):
        if e[0] == "bcast":
            size = bshape[e[1]]
        elif e[0] == "new":
            size = 1
        else:
            bounds = _const_slice(e[2], value.shape[e[1]])
            size = None if bounds is None else bounds[1] - bounds[0]
            if bounds is not None and size > 0:
                couplings.append((o, e[1], bounds[0], e[2] == slice(None)))
        if size is not None and size != out.shape[o]:
            return  # not the layout predicted: leave every dim stopped
    for o, d, start, whole in couplings:
        if whole:
            ctx.identity(ctx.sp(src, d), ctx.out(o))
        else:
            ctx.table.offset(ctx.out(o), ctx.sp(src, d), start)
    first = before
    for k, shape in zip(taken, shapes):
        for j, n in enumerate(shape):
            b = len(bshape) - len(shape) + j
            if n == bshape[b]:
                ctx.identity(ctx.sp(inter[k][1], j), ctx.out(first + b))


def index_tensor(ctx: BuildCtx) -> None:
    """``aten.index.Tensor(x, indices)``: ``indices[d]`` indexes dim ``d``, ``None`` keeps it whole
    (``x[:, idx]`` is ``[None, idx]``); the same rule as ``x[...]`` with index tensors."""
    x, indices = ctx.input, ctx.arg(1, "indices")
    if not ctx.is_tensor(x) or not isinstance(indices, (list, tuple)) or not any(i is not None for i in indices):
        return
    if not all(i is None or _index_tensor(i) for i in indices):
        return
    nd = ctx.val(x).dim()
    inter = [("idx", indices[d]) if d < len(indices) and indices[d] is not None else ("src", d, slice(None))
             for d in range(nd)]
    _couple_advanced(ctx, x, inter)
