"""Shape ops: reshape family, permutes, cat/stack, split family, indexing, expand/repeat."""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch import nn

from ..context import BuildCtx, RewriteCtx, tensor_slots
from ._registry import function_rule, method_rule, module_rule
from .common import couple_reshape, op_name

# -- reshape family -------------------------------------------------------------------------


def _shape_arg_span(node: torch.fx.Node) -> tuple[int, bool]:
    """Where the target shape sits in ``args``: (index, packed-as-one-sequence)."""
    if "shape" in node.kwargs or "size" in node.kwargs:
        return -1, True
    packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list, torch.Size))
    return 1, packed


def _new_shape_values(ctx: RewriteCtx, values: list) -> list:
    out = []
    for d, v in enumerate(values):
        if isinstance(v, int) and v != -1:
            out.append(ctx.new_size(ctx.old, d))
        else:
            out.append(v)
    return out


def _rewrite_shape(ctx: RewriteCtx) -> None:
    start, packed = _shape_arg_span(ctx.node)
    if start == -1:
        key = "shape" if "shape" in ctx.node.kwargs else "size"
        ctx.set_arg(None, key, tuple(_new_shape_values(ctx, list(ctx.node.kwargs[key]))))
    elif packed:
        ctx.set_arg(1, None, tuple(_new_shape_values(ctx, list(ctx.node.args[1]))))
    else:
        args = list(ctx.node.args)
        ctx.node.args = tuple(args[:1] + _new_shape_values(ctx, args[1:]))


def _shape_values(node: torch.fx.Node) -> list:
    start, packed = _shape_arg_span(node)
    if start == -1:
        return list(node.kwargs.get("shape", node.kwargs.get("size", ())))
    return list(node.args[1]) if packed else list(node.args[1:])


def couple_size_reads(ctx: BuildCtx, values: list) -> None:
    """An output dim sized by ``y.size(d)`` must keep as many entries as ``y``'s dim ``d`` (checked in the solve)."""
    out = ctx.out_val()
    if len(values) != out.dim():
        return
    for d, v in enumerate(values):
        if isinstance(v, torch.fx.Node):
            src = ctx.table.int_source.get(v.name)
            if isinstance(src, int) and ctx.table.spaces[src].size == out.shape[d]:
                ctx.table.size_constraints.append((src, ctx.out(d)))
                ctx.table.touch(ctx.out(d))


@function_rule(torch.reshape, rewrite=_rewrite_shape)
@method_rule("view", "reshape", rewrite=_rewrite_shape)
def reshape(ctx: BuildCtx) -> None:
    x = ctx.node.args[0]
    if ctx.is_tensor(x):
        if len(ctx.node.args) == 2 and isinstance(ctx.node.args[1], torch.dtype):
            return  # view(dtype): reinterpretation, stopped
        couple_reshape(ctx, x, ctx.shape(x), tuple(ctx.out_val().shape))
        couple_size_reads(ctx, _shape_values(ctx.node))


@function_rule(torch.flatten, torch.squeeze, torch.unsqueeze, torch.ravel)
@method_rule("flatten", "squeeze", "unsqueeze", "ravel", "view_as", "reshape_as", "squeeze_", "unsqueeze_")
@module_rule(nn.Flatten)
def reshape_no_constants(ctx: BuildCtx) -> None:
    x = ctx.node.args[0]
    if ctx.is_tensor(x):
        couple_reshape(ctx, x, ctx.shape(x), tuple(ctx.out_val().shape))


def _rewrite_unflatten(ctx: RewriteCtx) -> None:
    dim = ctx.old_arg(1, "dim")
    sizes = ctx.old_arg(2, "sizes")
    nd = ctx.old.meta["val"].dim()
    d0 = dim % (ctx.old.args[0].meta["val"].dim())
    new = [ctx.new_size(ctx.old, d0 + i) if isinstance(s, int) and s != -1 else s for i, s in enumerate(sizes)]
    del nd
    ctx.set_arg(2, "sizes", tuple(new))


@function_rule(torch.unflatten, rewrite=_rewrite_unflatten)
@method_rule("unflatten", rewrite=_rewrite_unflatten)
def unflatten(ctx: BuildCtx) -> None:
    reshape_no_constants(ctx)


def _fix_unflatten_module(module: nn.Unflatten, ctx: RewriteCtx) -> None:
    d0 = module.dim % ctx.old.args[0].meta["val"].dim()
    module.unflattened_size = tuple(ctx.new_size(ctx.old, d0 + i) for i in range(len(module.unflattened_size)))


@module_rule(nn.Unflatten, fix=_fix_unflatten_module)
def unflatten_module(ctx: BuildCtx) -> None:
    reshape_no_constants(ctx)


# -- permutes -------------------------------------------------------------------------------


def _permutation(ctx: BuildCtx) -> list[int] | None:
    node = ctx.node
    x = node.args[0]
    nd = ctx.val(x).dim()
    name = op_name(node.target)
    rest = [a for a in node.args[1:]]
    if name == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        dims = node.kwargs.get("dims", dims)
        return [d % nd for d in dims]
    if name in ("transpose", "swapaxes", "swapdims", "transpose_"):
        a, b = (rest + [node.kwargs.get("dim0"), node.kwargs.get("dim1")])[:2]
        perm = list(range(nd))
        a, b = a % nd, b % nd
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if name in ("movedim", "moveaxis"):
        src, dst = rest[0], rest[1]
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src, dst = [s % nd for s in src], [d % nd for d in dst]
        order = [d for d in range(nd) if d not in src]
        perm = [None] * nd
        for s, d in zip(src, dst):
            perm[d] = s
        it = iter(order)
        return [p if p is not None else next(it) for p in perm]
    if name in ("t",):
        return list(range(nd))[::-1]
    return None


@function_rule(torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim, torch.moveaxis, torch.t)
@method_rule("permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "transpose_")
def permute(ctx: BuildCtx) -> None:
    x = ctx.node.args[0]
    if not ctx.is_tensor(x):
        return
    perm = _permutation(ctx)
    if perm is None:
        return
    for d, src in enumerate(perm):
        ctx.identity(ctx.sp(x, src), ctx.out(d))


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
    dim = ctx.arg(1, "dim", 0) % out.dim()
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
    out = ctx.out_val()
    dim = ctx.arg(1, "dim", 0) % out.dim()
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
    x = ctx.old.args[0]
    dim = ctx.old_arg(2, "dim", 0) % x.meta["val"].dim()
    ctx.set_arg(1, "split_size_or_sections" if "split_size_or_sections" in ctx.node.kwargs else "split_size", _new_part_sizes(ctx, dim))


def _rewrite_chunk_like(ctx: RewriteCtx) -> None:
    """chunk/tensor_split(n) may give unequal parts after pruning: become ``torch.split(sizes)``."""
    x = ctx.old.args[0]
    dim = ctx.old_arg(2, "dim", 0) % x.meta["val"].dim()
    sizes = _new_part_sizes(ctx, dim)
    ctx.node.op = "call_function"
    ctx.node.target = torch.split
    ctx.node.args = (ctx.node.args[0], sizes, dim)
    ctx.node.kwargs = {}


@function_rule(torch.split, rewrite=_rewrite_split)
@method_rule("split", rewrite=_rewrite_split)
def split(ctx: BuildCtx) -> None:
    x = ctx.node.args[0]
    if ctx.is_tensor(x):
        _split_parts(ctx, x, ctx.arg(2, "dim", 0) % ctx.val(x).dim())


@function_rule(torch.chunk, torch.tensor_split, rewrite=_rewrite_chunk_like)
@method_rule("chunk", "tensor_split", rewrite=_rewrite_chunk_like)
def chunk(ctx: BuildCtx) -> None:
    x = ctx.node.args[0]
    if ctx.is_tensor(x) and isinstance(ctx.arg(1, None), int):
        _split_parts(ctx, x, ctx.arg(2, "dim", 0) % ctx.val(x).dim())


@function_rule(torch.unbind)
@method_rule("unbind")
def unbind(ctx: BuildCtx) -> None:
    x = ctx.node.args[0]
    if not ctx.is_tensor(x):
        return
    nd = ctx.val(x).dim()
    dim = ctx.arg(1, "dim", 0) % nd
    for i in range(len(ctx.out_val())):
        for d in range(nd):
            if d != dim:
                ctx.identity(ctx.sp(x, d), ctx.out(d if d < dim else d - 1, (i,)))


# -- indexing -------------------------------------------------------------------------------


def _index_plan(ctx_val, index) -> list[tuple] | None:
    """Per index item: ('slice', in_dim, out_dim, slice) | ('int', in_dim) | ('new', out_dim)."""
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
        else:
            return None  # tensor / node index: advanced indexing, stopped
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
    if isinstance(ints, tuple) and isinstance(index, int):
        ctx.table.int_source[ctx.node.name] = ints[index]
        return
    if isinstance(value, (tuple, list)):
        if isinstance(index, int):
            for path, t in tensor_slots(ctx.out_val()):
                for d in range(t.dim()):
                    ctx.identity(ctx.sp(src, d, (index,) + path), ctx.out(d, path))
        return
    if not isinstance(value, torch.Tensor):
        return
    plan = _index_plan(value, index)
    if plan is None:
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


# -- expand / repeat ------------------------------------------------------------------------


def _aligned(ctx: BuildCtx, x):
    """``(input dim, output dim, same size)`` for right-aligned dims (expand, repeat)."""
    v, out = ctx.val(x), ctx.out_val()
    off = out.dim() - v.dim()
    return [(d, off + d, v.shape[d] == out.shape[off + d]) for d in range(v.dim())]


@method_rule("expand", rewrite=_rewrite_shape)
def expand(ctx: BuildCtx) -> None:
    x = ctx.node.args[0]
    if not ctx.is_tensor(x):
        return
    for d, o, same in _aligned(ctx, x):
        if same:
            ctx.identity(ctx.sp(x, d), ctx.out(o))
    couple_size_reads(ctx, _shape_values(ctx.node))


@method_rule("expand_as")
def expand_as(ctx: BuildCtx) -> None:
    expand(ctx)
    other = ctx.node.args[1]
    if ctx.is_tensor(other):
        ctx.same_dims(other)


@method_rule("repeat")
def repeat(ctx: BuildCtx) -> None:
    """Repeating a dim tiles it: entry ``j`` of the output is entry ``j % n`` of the input."""
    x = ctx.node.args[0]
    if not ctx.is_tensor(x):
        return
    for d, o, same in _aligned(ctx, x):
        if same:
            ctx.identity(ctx.sp(x, d), ctx.out(o))
        else:
            ctx.table.strided(ctx.sp(x, d), ctx.out(o))


