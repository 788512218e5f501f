"""Spatial ops that keep channels: pooling, adaptive pooling, interpolation, padding."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..context import BuildCtx
from ._registry import function_rule, module_rule

_SPATIAL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.LPPool1d: 1, nn.LPPool2d: 2, nn.ZeroPad2d: 2,
    nn.ReflectionPad2d: 2, nn.ReplicationPad2d: 2, nn.ConstantPad2d: 2, nn.ZeroPad1d: 1, nn.ZeroPad3d: 3,
}
_SPATIAL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3, F.lp_pool1d: 1, F.lp_pool2d: 2,
}


def _keep_leading(ctx: BuildCtx, spatial: int) -> None:
    x = ctx.input
    if not ctx.is_tensor(x) or not hasattr(ctx.out_val(), "dim"):
        return  # e.g. return_indices=True: tuple output, stopped
    nd = ctx.val(x).dim()
    ctx.same_dims(x, dims=range(nd - spatial))


@module_rule(*_SPATIAL_MODULES)
def spatial_module(ctx: BuildCtx) -> None:
    _keep_leading(ctx, _SPATIAL_MODULES.get(type(ctx.module), 2))


@function_rule(*_SPATIAL_FUNCTIONS)
def spatial_function(ctx: BuildCtx) -> None:
    _keep_leading(ctx, _SPATIAL_FUNCTIONS[ctx.node.target])


@module_rule(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
@function_rule(F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear)
def resize(ctx: BuildCtx) -> None:
    x = ctx.input
    if ctx.is_tensor(x):
        ctx.same_dims(x, dims=range(2))


@function_rule(F.pad)
def pad(ctx: BuildCtx) -> None:
    """Dims padded by a literal 0 on both sides pass through; any other amount (a literal or one
    computed at run time from sizes, ``(window - W % window) % window``) makes its dim produced.
    Swin-style models pad H and W by computed amounts and their channels by literal zeros."""
    x, amounts = ctx.arg(0, "input"), ctx.arg(1, "pad")
    if not ctx.is_tensor(x) or not isinstance(amounts, (list, tuple)):
        return
    nd = ctx.val(x).dim()
    padded = {nd - 1 - i // 2 for i, a in enumerate(amounts) if not (isinstance(a, int) and a == 0)}
    ctx.same_dims(x, dims=[d for d in range(nd) if d not in padded])
