"""Convolutions: plain, grouped, depthwise, transposed; modules and functional forms."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..context import BuildCtx, RewriteCtx
from ._registry import function_rule, module_rule


def _channel_dim(ctx: BuildCtx, x, spatial: int) -> int:
    return ctx.val(x).dim() - spatial - 1


def _pointwise_dims(kernel, stride, padding, dilation) -> list[int]:
    """Spatial dims (0-based among the spatial ones) along which the conv maps each position to the
    same position alone: kernel 1, stride 1, no padding. Along those, positions are entries like
    channels (CoaT aggregates its three class tokens with a ``Conv1d(3, 1, 1)`` over ``(B, 3, C)``:
    the spatial dim is the embedding)."""
    k = len(kernel)

    def each(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * k

    if isinstance(padding, str):
        padding = (0,) * k if padding == "valid" or all(s == 1 for s in each(kernel)) else None
    if padding is None or not all(isinstance(v, int) for v in (*each(kernel), *each(stride), *each(padding), *each(dilation))):
        return []
    return [d for d, (kk, s, p) in enumerate(zip(each(kernel), each(stride), each(padding))) if kk == 1 and s == 1 and p == 0]


def _couple_conv(ctx: BuildCtx, x, w_in: int, w_out: int, groups: int, cin: int, cout: int, spatial: int,
                 pointwise: list[int] = ()) -> None:
    """Couple a conv whose weight is ``(cout, cin/groups, *k)``; ``w_in``/``w_out`` are weight-dim spaces;
    ``pointwise`` spatial dims pass through one to one (``_pointwise_dims``)."""
    cd = _channel_dim(ctx, x, spatial)
    for d in range(cd):
        ctx.identity(ctx.sp(x, d), ctx.out(d))
    for d in pointwise:
        ctx.identity(ctx.sp(x, cd + 1 + d), ctx.out(cd + 1 + d))
    ctx.identity(w_out, ctx.out(cd))
    xin = ctx.sp(x, cd)
    if groups == 1:
        ctx.identity(xin, w_in)
    elif cin // groups == 1:
        # depthwise (with channel multiplier): input channel c owns output block c
        ctx.table.block(xin, w_out)
    else:
        # grouped: remove the same within-group positions from every group, groups stay
        ctx.table.strided(w_in, xin)
        ctx.table.tie_period(w_out, cout // groups)


def _fix_conv(module: nn.modules.conv._ConvNd, ctx: RewriteCtx) -> None:
    x = ctx.old.args[0]
    cd = x.meta["val"].dim() - len(module.kernel_size) - 1
    new_in = ctx.new_size(x, cd)
    new_out = ctx.new_size(ctx.old, cd)
    depthwise = module.groups > 1 and module.in_channels // module.groups == 1
    if depthwise:
        module.groups = new_in
    module.in_channels = new_in
    module.out_channels = new_out


@module_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, fix=_fix_conv)
def conv(ctx: BuildCtx) -> None:
    m = ctx.module
    x = ctx.input
    spatial = len(m.kernel_size)
    w_out = ctx.p("weight", 0)
    w_in = ctx.p("weight", 1) if m.in_channels // m.groups > 1 or m.groups == 1 else None
    if m.bias is not None:
        ctx.identity(ctx.p("bias", 0), w_out)
    pointwise = _pointwise_dims(m.kernel_size, m.stride, m.padding, m.dilation)
    _couple_conv(ctx, x, w_in, w_out, m.groups, m.in_channels, m.out_channels, spatial, pointwise)


@module_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, fix=_fix_conv)
def conv_transpose(ctx: BuildCtx) -> None:
    m = ctx.module
    x = ctx.input
    spatial = len(m.kernel_size)
    cd = _channel_dim(ctx, x, spatial)
    for d in range(cd):
        ctx.identity(ctx.sp(x, d), ctx.out(d))
    out = ctx.out(cd)
    if m.bias is not None:
        ctx.identity(ctx.p("bias", 0), out)
    if m.groups == 1:
        ctx.identity(ctx.sp(x, cd), ctx.p("weight", 0))
        ctx.identity(ctx.p("weight", 1), out)
    elif m.in_channels == m.groups:
        ctx.identity(ctx.sp(x, cd), ctx.p("weight", 0))
        ctx.table.block(ctx.p("weight", 0), out)
    # other grouped transposed convs: left uncoupled, hence stopped


def _functional_conv(spatial: int):
    def couple(ctx: BuildCtx) -> None:
        x, w = ctx.arg(0, "input"), ctx.arg(1, "weight")
        b = ctx.arg(2, "bias", None)
        groups = ctx.arg(6, "groups", 1)
        if not (ctx.is_tensor(x) and ctx.is_tensor(w)) or not isinstance(groups, int):
            return
        cout, cin_g = ctx.shape(w)[:2]
        cin = cin_g * groups
        if b is not None and ctx.is_tensor(b):
            ctx.identity(ctx.sp(b, 0), ctx.sp(w, 0))
        w_in = ctx.sp(w, 1) if groups == 1 or cin_g > 1 else None
        pointwise = _pointwise_dims(ctx.shape(w)[2:], ctx.arg(3, "stride", 1), ctx.arg(4, "padding", 0),
                                    ctx.arg(5, "dilation", 1))
        _couple_conv(ctx, x, w_in, ctx.sp(w, 0), groups, cin, cout, spatial, pointwise)

    couple.__name__ = f"functional_conv{spatial}d"
    return couple


def rewrite_functional_conv(ctx: RewriteCtx) -> None:
    """A depthwise functional conv has one group per kept input channel."""
    w = ctx.old_arg(1, "weight")
    groups = ctx.old_arg(6, "groups", 1)
    if isinstance(groups, int) and groups > 1 and w.meta["val"].shape[1] == 1:
        x = ctx.old_arg(0, "input")
        spatial = w.meta["val"].dim() - 2
        ctx.set_arg(6, "groups", ctx.new_size(x, x.meta["val"].dim() - spatial - 1))


FUNCTIONAL_CONV = {1: _functional_conv(1), 2: _functional_conv(2), 3: _functional_conv(3)}
function_rule(F.conv1d, rewrite=rewrite_functional_conv)(FUNCTIONAL_CONV[1])
function_rule(F.conv2d, rewrite=rewrite_functional_conv)(FUNCTIONAL_CONV[2])
function_rule(F.conv3d, rewrite=rewrite_functional_conv)(FUNCTIONAL_CONV[3])
