"""``surgery.layers.StripeConv``: a leaf; its input channels are prunable (each stripe's weight row is
an input slice), its output channels are fixed (filters with no live stripe were pruned before the
conversion), batch stays batch."""

from __future__ import annotations

from ...layers import StripeConv
from ..context import BuildCtx, RewriteCtx
from ._registry import module_rule


def _fix_stripe(module: StripeConv, ctx: RewriteCtx) -> None:
    module.in_channels = module.weight.shape[1]


@module_rule(StripeConv, fix=_fix_stripe)
def stripe_conv(ctx: BuildCtx) -> None:
    x = ctx.node.args[0]
    ctx.identity(ctx.sp(x, 0), ctx.out(0))
    ctx.identity(ctx.sp(x, 1), ctx.p("weight", 1))
