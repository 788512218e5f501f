"""Functional transposed convolutions: ``F.conv_transpose{1,2,3}d`` and, through ``aten.py``,
``aten.conv_transpose{1,2,3}d.input`` (what ``nn.ConvTranspose*d`` becomes under ``torch.export``).

The weight is ``(cin, cout / groups, *k)``: input channels on dim 0, output channels on dim 1. As for
the ``nn.ConvTranspose*d`` module rule (``conv.py``): plain (``groups=1``) and depthwise
(``groups == cin``: input channel ``c`` owns output block ``c``) are coupled; other grouped
transposed convs are left uncoupled, hence stopped.
"""

from __future__ import annotations

import torch.nn.functional as F

from ..context import BuildCtx, RewriteCtx
from ._registry import function_rule

__all__ = ["FUNCTIONAL_CONV_TRANSPOSE", "couple_conv_transpose", "rewrite_functional_conv_transpose"]


def couple_conv_transpose(ctx: BuildCtx, x, w_in: int, w_out: int, bias: int | None, groups: int, cin: int,
                          spatial: int) -> None:
    """``w_in`` / ``w_out``: spaces of the weight's dims 0 (input channels) and 1 (output per group)."""
    cd = ctx.val(x).dim() - spatial - 1
    for d in range(cd):
        ctx.identity(ctx.sp(x, d), ctx.out(d))
    out = ctx.out(cd)
    if bias is not None:
        ctx.identity(bias, out)
    if groups == 1:
        ctx.identity(ctx.sp(x, cd), w_in)
        ctx.identity(w_out, out)
    elif cin == groups:
        ctx.identity(ctx.sp(x, cd), w_in)
        ctx.table.block(w_in, out)


def _functional_conv_transpose(spatial: int):
    def couple(ctx: BuildCtx) -> None:
        x, w = ctx.arg(0, "input"), ctx.arg(1, "weight")
        b = ctx.arg(2, "bias", None)
        groups = ctx.arg(6, "groups", 1)
        if not (ctx.is_tensor(x) and ctx.is_tensor(w)) or not isinstance(groups, int):
            return
        bias = ctx.sp(b, 0) if ctx.is_tensor(b) else None
        couple_conv_transpose(ctx, x, ctx.sp(w, 0), ctx.sp(w, 1), bias, groups, ctx.shape(w)[0], spatial)

    couple.__name__ = f"functional_conv_transpose{spatial}d"
    return couple


def rewrite_functional_conv_transpose(ctx: RewriteCtx) -> None:
    """A depthwise transposed conv has one group per kept input channel."""
    w = ctx.old_arg(1, "weight")
    groups = ctx.old_arg(6, "groups", 1)
    if isinstance(groups, int) and groups > 1 and w.meta["val"].shape[0] == groups:
        ctx.set_arg(6, "groups", ctx.new_size(w, 0))


FUNCTIONAL_CONV_TRANSPOSE = {n: _functional_conv_transpose(n) for n in (1, 2, 3)}
for _n, _f in ((1, F.conv_transpose1d), (2, F.conv_transpose2d), (3, F.conv_transpose3d)):
    function_rule(_f, rewrite=rewrite_functional_conv_transpose)(FUNCTIONAL_CONV_TRANSPOSE[_n])
