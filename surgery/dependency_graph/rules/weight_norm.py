"""Weight normalisation: ``w = g * v / ||v||``, the norm taken over every dim of ``v`` but ``dim``.

It appears as ``torch._weight_norm(v, g, dim)`` (fx, when a forward calls it; ``aten._weight_norm``
under ``torch.export``, which is also what ``nn.utils.weight_norm`` and
``nn.utils.parametrizations.weight_norm`` become there) and, in fx graphs of a parametrized module
that fx enters, as a call of its ``ParametrizationList`` (``parametrizations.weight``, no arguments,
parameters ``original0`` = g and ``original1`` = v).

Along ``dim`` (a conv's output channels for the default ``dim=0``) every entry has its own ``g`` and
its own norm: removing entries of ``v`` and ``g`` together is exact. Along every other dim (the input
channels) the norm spans the channels: a pruned ``v`` has a smaller norm, so the kept weights grow.
That is a cross-channel statistic, flagged like LayerNorm's (pruned equals masked still holds,
since a zeroed slice of ``v`` adds nothing to the norm, but neither equals the original with the
channel zeroed). ``dim=-1`` (``dim=None`` in ``nn.utils``) normalises the whole tensor by one norm.
In mask mode only ``g`` is zeroed along ``dim`` (``v`` is exempt): that zeroes the channel, where a
zeroed row of ``v`` would give 0/0.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrizations, parametrize

from ..context import BuildCtx, RewriteCtx
from ..reasons import Reason
from ._registry import function_rule, module_rule

__all__ = ["weight_norm", "weight_norm_parametrization"]


def _couple(ctx: BuildCtx, v, g, nd: int, dim: int) -> None:
    """``v(d)`` / ``g(d)``: the space of dim ``d`` of v / g; ``dim``: the raw argument (-1: whole tensor)."""
    if dim != -1 and not -nd <= dim < nd:
        return  # not a weight norm this rule knows: every space stays stopped
    keep = dim % nd if dim != -1 else None
    for d in range(nd):
        ctx.identity(v(d), ctx.out(d))
        if d == keep:
            ctx.identity(g(d), ctx.out(d))  # one scale and one norm per entry: exact
        else:
            over = "the whole tensor" if keep is None else f"every dim but {keep}"
            ctx.cross(ctx.out(d), f"weight norm over {over}")


@function_rule(torch._weight_norm, aliases={"dim": "except_dim"})
def weight_norm(ctx: BuildCtx) -> None:
    """``_weight_norm(v, g, dim=0)``; ``dim`` is read raw (``-1`` means no dim, not the last one)."""
    v, g = ctx.arg(0, "v"), ctx.arg(1, "g")
    dim = ctx.arg(2, "except_dim", 0)
    if not (ctx.is_tensor(v) and ctx.is_tensor(g)) or not isinstance(dim, int):
        return
    nd = ctx.val(v).dim()
    if ctx.val(g).dim() != nd and dim != -1:
        return
    _couple(ctx, lambda d: ctx.sp(v, d), lambda d: ctx.sp(g, d), nd, dim)
    if v.op == "get_attr" and dim != -1:
        owner, _, name = v.target.rpartition(".")
        ctx.table.mask_exempt.add((owner, name, dim % nd))


def _fix_parametrization(module, ctx: RewriteCtx) -> None:
    """Nothing to set: the parametrization holds no widths (its tensors are sliced already)."""


@module_rule(parametrize.ParametrizationList, fix=_fix_parametrization)
def weight_norm_parametrization(ctx: BuildCtx) -> None:
    """``module.parametrizations.weight()``: one ``_WeightNorm`` over ``original0`` (g), ``original1`` (v)."""
    m = ctx.module
    out = ctx.out_val()
    if not isinstance(out, torch.Tensor):
        return
    if len(m) != 1 or not isinstance(m[0], parametrizations._WeightNorm) or not ctx.has("original1"):
        what = " -> ".join(type(p).__name__ for p in m)
        for d in range(out.dim()):
            ctx.stop(ctx.out(d), Reason.UNSUPPORTED_OP, f"{what} parametrization ({ctx.node.target})")
        return
    dim = m[0].dim
    if ctx.module.original0.dim() != out.dim() and dim != -1:
        return
    _couple(ctx, lambda d: ctx.p("original1", d), lambda d: ctx.p("original0", d), out.dim(), dim)
    if dim != -1:
        ctx.table.mask_exempt.add((ctx.owner, "original1", dim % out.dim()))
