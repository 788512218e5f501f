"""Shape ops: the reshape family (with size constants rewritten), permutes, expand/repeat."""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from ..context import BuildCtx, RewriteCtx
from ._registry import function_rule, method_rule, module_rule
from .common import couple_reshape, op_name
from .sizes import couple_size_reads, packed_shape_node, rewrite_packed_shape
from .statistics import couple_points

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
    shape = packed_shape_node(ctx.old, _shape_values(ctx.old))
    if shape is not None:  # ``x.view(x.size()[:-1] + (h, d))``: the constants live in another node
        rewrite_packed_shape(ctx, shape)
        return
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
        value = node.kwargs.get("shape", node.kwargs.get("size", ()))
        return [value] if isinstance(value, torch.fx.Node) else list(value)
    return list(node.args[1]) if packed else list(node.args[1:])


@function_rule(torch.reshape, rewrite=_rewrite_shape)
@method_rule("view", "reshape", rewrite=_rewrite_shape)
def reshape(ctx: BuildCtx) -> None:
    x = ctx.input
    if ctx.is_tensor(x):
        if len(ctx.node.args) == 2 and isinstance(ctx.node.args[1], torch.dtype):
            return  # view(dtype): reinterpretation, stopped
        couple_reshape(ctx, x, ctx.shape(x), tuple(ctx.out_val().shape))
        couple_size_reads(ctx, _shape_values(ctx.node))


@function_rule(torch.flatten, torch.squeeze, torch.unsqueeze, torch.ravel)
@method_rule("flatten", "squeeze", "unsqueeze", "ravel", "squeeze_", "unsqueeze_")
@module_rule(nn.Flatten)
def reshape_no_constants(ctx: BuildCtx) -> None:
    x = ctx.input
    if ctx.is_tensor(x):
        couple_reshape(ctx, x, ctx.shape(x), tuple(ctx.out_val().shape))


@method_rule("view_as", "reshape_as")
def reshape_as(ctx: BuildCtx) -> None:
    """``x.reshape_as(other)`` takes ``other``'s shape at run time: each output dim keeps as many
    entries as ``other``'s (timm's ``StdConv2d`` reshapes its standardised weight back with
    ``reshape_as(self.weight)``); ``other`` is only read."""
    reshape_no_constants(ctx)
    other = ctx.arg(1, "other", None)
    if not ctx.is_tensor(other) or other is ctx.input or ctx.val(other).dim() != ctx.out_val().dim():
        return
    table = ctx.table
    for d in range(ctx.out_val().dim()):
        out = ctx.out(d)
        if out in table.touched:  # kept counts agree; a dim the reshape cannot explain stops both
            table.size_constraints.append((ctx.sp(other, d), out))
            table.touch(ctx.sp(other, d))


def _rewrite_unflatten(ctx: RewriteCtx) -> None:
    dim = ctx.old_arg(1, "dim")
    sizes = ctx.old_arg(2, "sizes")
    d0 = dim % ctx.old.args[0].meta["val"].dim()
    new = [ctx.new_size(ctx.old, d0 + i) if isinstance(s, int) and s != -1 else s for i, s in enumerate(sizes)]
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
    x = ctx.input
    if not ctx.is_tensor(x):
        return
    perm = _permutation(ctx)
    if perm is None:
        return
    for d, src in enumerate(perm):
        ctx.identity(ctx.sp(x, src), ctx.out(d))


# -- expand / repeat ------------------------------------------------------------------------


def _aligned(ctx: BuildCtx, x):
    """``(input dim, output dim, same size)`` for right-aligned dims (expand, repeat)."""
    v, out = ctx.val(x), ctx.out_val()
    off = out.dim() - v.dim()
    return [(d, off + d, v.shape[d] == out.shape[off + d]) for d in range(v.dim())]


@method_rule("expand", rewrite=_rewrite_shape)
def expand(ctx: BuildCtx) -> None:
    x = ctx.input
    if not ctx.is_tensor(x):
        return
    for d, o, same in _aligned(ctx, x):
        if same:
            ctx.identity(ctx.sp(x, d), ctx.out(o))
        elif ctx.table.gqa == "query" and ctx.val(x).shape[d] == 1 and d > 0 and ctx.table.fed[ctx.sp(x, d - 1)]:
            # copies of each KV head (repeat_kv): a dim the merge into query heads may follow, heads.gqa_merge
            ctx.table.cache.setdefault("gqa_copies", set()).add(ctx.out(o))
            ctx.table.touch(ctx.out(o))
    couple_size_reads(ctx, _shape_values(ctx.node))
    couple_points(ctx)  # a statistic expanded back over the dim it summarises


@method_rule("expand_as")
def expand_as(ctx: BuildCtx) -> None:
    expand(ctx)
    other = ctx.node.args[1]
    if ctx.is_tensor(other):
        ctx.same_dims(other)


@method_rule("repeat")
def repeat(ctx: BuildCtx) -> None:
    """Repeating a dim tiles it: entry ``j`` of the output is entry ``j % n`` of the input."""
    x = ctx.input
    if not ctx.is_tensor(x):
        return
    for d, o, same in _aligned(ctx, x):
        if same:
            ctx.identity(ctx.sp(x, d), ctx.out(o))
        else:
            ctx.table.strided(ctx.sp(x, d), ctx.out(o))


