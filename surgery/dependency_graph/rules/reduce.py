"""Reductions, softmax, matrix products and einsum."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..context import BuildCtx
from ._registry import function_rule, method_rule, module_rule
from .common import normalize_dims, op_name
from .statistics import mark_statistic


_VECTOR_NORMS = tuple(f for f in (getattr(torch.linalg, "vector_norm", None),) if f is not None)


@function_rule(torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp, torch.norm,
               *_VECTOR_NORMS)
@method_rule("mean", "sum", "amax", "amin", "std", "var", "logsumexp", "norm")
def reduction(ctx: BuildCtx) -> None:
    """Non-reduced dims pass through; reduced dims are consumed (stopped), unless the result is a
    statistic broadcast back along them (a hand-written norm, ``statistics.py``): then they are
    cross-channel."""
    x = ctx.input
    if not ctx.is_tensor(x) or not isinstance(ctx.out_val(), torch.Tensor):
        return
    nd = ctx.val(x).dim()
    name = op_name(ctx.node.target)
    dim_pos = 2 if name in ("norm", "vector_norm") else 1
    dims = ctx.arg(dim_pos, "dim", None)
    if isinstance(dims, torch.fx.Node):
        return
    reduced = set(normalize_dims(dims, nd)) if nd else set()
    keep = ctx.out_val().dim() == nd
    o = 0
    for d in range(nd):
        if d in reduced:
            o += keep
            continue
        ctx.identity(ctx.sp(x, d), ctx.out(o))
        o += 1
    mark_statistic(ctx, x, reduced, name)


@function_rule(F.normalize)
def normalize(ctx: BuildCtx) -> None:
    """``F.normalize(x, p, dim)``: ``x`` divided by its norm over ``dim``, a cross-channel statistic."""
    x = ctx.input
    dim = ctx.arg(2, "dim", 1)
    if not ctx.is_tensor(x) or not isinstance(dim, int):
        return
    ctx.same_dims(x)
    ctx.cross(ctx.out(dim), f"F.normalize over dim {dim} ({ctx.node.name})")


@function_rule(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax)
@method_rule("softmax", "log_softmax")
@module_rule(nn.Softmax, nn.LogSoftmax, nn.Softmax2d)
def softmax(ctx: BuildCtx) -> None:
    x = ctx.input
    if not ctx.is_tensor(x):
        return
    nd = ctx.val(x).dim()
    if ctx.module is not None:
        dim = -3 if isinstance(ctx.module, nn.Softmax2d) else ctx.module.dim
    else:
        dim = ctx.arg(1, "dim", None)
    if not isinstance(dim, int):
        return  # implicit dim: which dim is normalised is not known here, so nothing is coupled
    ctx.same_dims(x)
    ctx.cross(ctx.out(dim % nd), "softmax over the dim")


def _couple_matmul(ctx: BuildCtx, a, b) -> None:
    va, vb, out = ctx.val(a), ctx.val(b), ctx.out_val()
    if va.dim() < 2 or vb.dim() < 2:
        return  # vector products: stopped
    ctx.identity(ctx.sp(a, -1), ctx.sp(b, -2))  # contracted: removed from both operands together
    ctx.identity(ctx.sp(a, -2), ctx.out(-2))
    ctx.identity(ctx.sp(b, -1), ctx.out(-1))
    for v, x in ((va, a), (vb, b)):
        off = out.dim() - v.dim()
        for d in range(v.dim() - 2):
            if v.shape[d] == out.shape[off + d]:
                ctx.identity(ctx.sp(x, d), ctx.out(off + d))


@function_rule(torch.matmul, operator.matmul, torch.bmm, torch.mm)
@method_rule("matmul", "bmm", "mm")
def matmul(ctx: BuildCtx) -> None:
    a, b = ctx.node.args[0], ctx.node.args[1]
    if ctx.is_tensor(a) and ctx.is_tensor(b):
        _couple_matmul(ctx, a, b)


@function_rule(torch.einsum)
def einsum(ctx: BuildCtx) -> None:
    eq = ctx.node.args[0]
    ops = ctx.node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    if not isinstance(eq, str) or "..." in eq or not all(ctx.is_tensor(o) for o in ops):
        return
    eq = eq.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ops):
        return
    first: dict[str, int] = {}
    for term, op in zip(terms, ops):
        shape = ctx.shape(op)
        for d, letter in enumerate(term):
            sid = ctx.sp(op, d)
            if shape[d] == 1:
                continue
            if letter in first:
                ctx.identity(first[letter], sid)
            else:
                first[letter] = sid
    if rhs:
        out_shape = tuple(ctx.out_val().shape)
        for d, letter in enumerate(rhs):
            if letter in first and out_shape[d] != 1:
                ctx.identity(first[letter], ctx.out(d))

