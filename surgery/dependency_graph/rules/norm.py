"""Normalisation layers. BatchNorm/InstanceNorm are per-channel (exact); LayerNorm and GroupNorm with
one group normalise across channels, so their groups are flagged cross-channel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..context import BuildCtx, RewriteCtx
from ._registry import function_rule, module_rule

_PER_CHANNEL = ("weight", "bias", "running_mean", "running_var")


def _fix_batchnorm(module, ctx: RewriteCtx) -> None:
    for name in _PER_CHANNEL:
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor):
            module.num_features = t.shape[0]
            return
    module.num_features = ctx.new_size(ctx.old, 1)


@module_rule(nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, fix=_fix_batchnorm)
def batchnorm(ctx: BuildCtx) -> None:
    x = ctx.input
    ctx.same_dims(x)
    cdim = 1 if ctx.val(x).dim() > 1 else 0
    for name in _PER_CHANNEL:
        if ctx.has(name):
            ctx.identity(ctx.p(name, 0), ctx.out(cdim))


@function_rule(F.batch_norm, F.instance_norm)
def functional_batchnorm(ctx: BuildCtx) -> None:
    """Per channel (dim 1). ``F.batch_norm(..., training=True)`` normalises with statistics over
    every other dim, so those are cross-channel: timm's ``StdConv2d`` standardises its weight as
    ``batch_norm(w.reshape(1, out, -1), training=True)``, where dim 2 holds the input channels."""
    x = ctx.arg(0, "input")
    ctx.same_dims(x)
    for i, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        t = ctx.arg(i, name, None)
        if ctx.is_tensor(t):
            ctx.identity(ctx.sp(t, 0), ctx.out(1))
    if ctx.node.target is F.batch_norm and ctx.arg(5, "training", False) is not False:
        for d in range(ctx.val(x).dim()):
            if d != 1:
                ctx.cross(ctx.out(d), f"batch_norm statistics over dim {d} ({ctx.node.name}, training=True)")


def _couple_layernorm(ctx: BuildCtx, x, k: int, weight, bias) -> None:
    ctx.same_dims(x)
    nd = ctx.val(x).dim()
    for i in range(k):
        d = nd - k + i
        ctx.cross(ctx.out(d), "LayerNorm statistics")
        if weight is not None:
            ctx.identity(weight(i), ctx.out(d))
        if bias is not None:
            ctx.identity(bias(i), ctx.out(d))


def _fix_layernorm(module: nn.LayerNorm, ctx: RewriteCtx) -> None:
    k = len(module.normalized_shape)
    nd = ctx.old.meta["val"].dim()
    module.normalized_shape = tuple(ctx.new_size(ctx.old, nd - k + i) for i in range(k))


@module_rule(nn.LayerNorm, nn.RMSNorm, fix=_fix_layernorm)
def layernorm(ctx: BuildCtx) -> None:
    m = ctx.module
    k = len(m.normalized_shape)
    w = (lambda i: ctx.p("weight", i)) if ctx.has("weight") else None
    b = (lambda i: ctx.p("bias", i)) if ctx.has("bias") else None
    _couple_layernorm(ctx, ctx.input, k, w, b)


def _rewrite_layer_norm(ctx: RewriteCtx) -> None:
    shape = ctx.old_arg(1, "normalized_shape")
    k = len(shape)
    nd = ctx.old.meta["val"].dim()
    ctx.set_arg(1, "normalized_shape", [ctx.new_size(ctx.old, nd - k + i) for i in range(k)])


@function_rule(F.layer_norm, F.rms_norm, rewrite=_rewrite_layer_norm)
def functional_layernorm(ctx: BuildCtx) -> None:
    x = ctx.arg(0, "input")
    shape = ctx.arg(1, "normalized_shape")
    w, b = ctx.arg(2, "weight", None), ctx.arg(3, "bias", None)
    if not isinstance(shape, (list, tuple, torch.Size)) or not all(isinstance(s, int) for s in shape):
        return
    wf = (lambda i: ctx.sp(w, i)) if ctx.is_tensor(w) else None
    bf = (lambda i: ctx.sp(b, i)) if ctx.is_tensor(b) else None
    _couple_layernorm(ctx, x, len(shape), wf, bf)


def _couple_groupnorm(ctx: BuildCtx, x, groups: int, channels: int, params) -> None:
    ctx.same_dims(x)
    out = ctx.out(1)
    if groups == 1:
        ctx.cross(out, "GroupNorm with one group")
    elif groups != channels:
        ctx.table.tie_blocks(out, channels // groups)  # whole groups go: statistics stay exact
    for sid in params:
        ctx.identity(sid, out)


def _fix_groupnorm(module: nn.GroupNorm, ctx: RewriteCtx) -> None:
    new_c = ctx.new_size(ctx.old, 1)
    if module.num_groups > 1:
        module.num_groups = new_c // (module.num_channels // module.num_groups)
    module.num_channels = new_c


@module_rule(nn.GroupNorm, fix=_fix_groupnorm)
def groupnorm(ctx: BuildCtx) -> None:
    m = ctx.module
    params = [ctx.p(n, 0) for n in ("weight", "bias") if ctx.has(n)]
    _couple_groupnorm(ctx, ctx.input, m.num_groups, m.num_channels, params)


def _rewrite_group_norm(ctx: RewriteCtx) -> None:
    groups = ctx.old_arg(1, "num_groups")
    channels = ctx.old.meta["val"].shape[1]
    if groups > 1:
        ctx.set_arg(1, "num_groups", ctx.new_size(ctx.old, 1) // (channels // groups))


@function_rule(F.group_norm, rewrite=_rewrite_group_norm)
def functional_groupnorm(ctx: BuildCtx) -> None:
    x, groups = ctx.arg(0, "input"), ctx.arg(1, "num_groups")
    if not isinstance(groups, int):
        return
    params = [ctx.sp(t, 0) for t in (ctx.arg(2, "weight", None), ctx.arg(3, "bias", None)) if ctx.is_tensor(t)]
    _couple_groupnorm(ctx, x, groups, ctx.val(x).shape[1], params)


@module_rule(nn.LocalResponseNorm)
def local_response_norm(ctx: BuildCtx) -> None:
    ctx.same_dims(ctx.input)
    ctx.cross(ctx.out(1), "LocalResponseNorm across neighbouring channels")
