"""``repeat_interleave``: each entry along one dim repeated ``repeats`` times in place.

Every other dim passes through. Along the repeated dim, input entry ``i`` owns the output block
``[i*r, (i+1)*r)`` when ``repeats`` is a literal int ``r`` (removing entry ``i`` removes its block,
and ``r`` stays right); repeats given per entry (a tensor) or computed at run time
(``B // q.shape[0]`` in GCViT's global query) leave that dim produced. Without ``dim`` the input
is flattened first: everything is stopped.
"""

from __future__ import annotations

import torch

from ..context import BuildCtx
from ._registry import function_rule, method_rule

aten = torch.ops.aten
_ATEN = [getattr(aten.repeat_interleave, o) for o in ("self_int", "self_Tensor") if hasattr(aten.repeat_interleave, o)]


@function_rule(torch.repeat_interleave, *_ATEN)
@method_rule("repeat_interleave")
def repeat_interleave(ctx: BuildCtx) -> None:
    x = ctx.input
    dim = ctx.arg(2, "dim", None)
    out = ctx.out_val()
    if not ctx.is_tensor(x) or not isinstance(dim, int) or not isinstance(out, torch.Tensor):
        return
    nd = ctx.val(x).dim()
    if out.dim() != nd:
        return
    for d in range(nd):
        if d != dim:
            ctx.identity(ctx.sp(x, d), ctx.out(d))
    repeats = ctx.arg(1, "repeats")
    output_size = ctx.arg(3, "output_size", None)
    if isinstance(repeats, int) and not isinstance(repeats, bool) and repeats >= 1 and output_size is None:
        ctx.table.block(ctx.sp(x, dim), ctx.out(dim))
