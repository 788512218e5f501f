"""Recurrent layers (leaf modules): the hidden size is one group across layers and directions.

Removing hidden unit ``i`` removes its row in every gate block of ``weight_ih``/``weight_hh``/biases,
its column in ``weight_hh`` and in the next layer's ``weight_ih``, and its entry in every output.
With masked weights a removed unit's gates see zero pre-activations and its state stays zero, so the
pruned and masked models agree.
"""

from __future__ import annotations

import torch
from torch import nn

from ..context import BuildCtx, RewriteCtx
from ._registry import module_rule


def _fix_rnn(m: nn.RNNBase, ctx: RewriteCtx) -> None:
    m.input_size = m.weight_ih_l0.shape[1]
    m.hidden_size = m.weight_hh_l0.shape[1]
    m._init_flat_weights()


@module_rule(nn.RNNBase, fix=_fix_rnn)
def rnn(ctx: BuildCtx) -> None:
    m = ctx.module
    if m.proj_size:
        return
    x = ctx.input
    if not ctx.is_tensor(x):
        return  # packed sequences: stopped
    suffixes = [""] + (["_reverse"] if m.bidirectional else [])
    hid = ctx.p("weight_hh_l0", 1)
    ctx.identity(ctx.sp(x, -1), ctx.p("weight_ih_l0", 1))
    for layer in range(m.num_layers):
        for s in suffixes:
            for name in (f"weight_ih_l{layer}{s}", f"weight_hh_l{layer}{s}", f"bias_ih_l{layer}{s}", f"bias_hh_l{layer}{s}"):
                if ctx.has(name):
                    ctx.table.strided(hid, ctx.p(name, 0))
            ctx.identity(hid, ctx.p(f"weight_hh_l{layer}{s}", 1))
            if layer:
                ctx.table.strided(hid, ctx.p(f"weight_ih_l{layer}{s}", 1))
            elif s:
                ctx.identity(ctx.sp(x, -1), ctx.p(f"weight_ih_l0{s}", 1))
    out = ctx.out_val()
    nd = ctx.val(x).dim()
    ctx.table.strided(hid, ctx.out(-1, (0,)))
    for d in range(nd - 1):
        ctx.identity(ctx.sp(x, d), ctx.out(d, (0,)))
    states = [(1,)] if isinstance(out[1], torch.Tensor) else [(1, 0), (1, 1)]
    for path in states:
        ctx.identity(hid, ctx.out(-1, path))
    hx = ctx.arg(1, "hx", None)
    if hx is not None:
        items = [hx] if not isinstance(hx, (tuple, list)) else list(hx)
        for h in items:
            if ctx.is_tensor(h):
                ctx.identity(hid, ctx.sp(h, -1))
