"""Attention: ``nn.MultiheadAttention`` (leaf) and torchvision's Swin window attention.

Both are pruned by whole heads: the attention scale ``1/sqrt(head_dim)`` stays the same, so the
pruned model equals the masked one. ``nn.MultiheadAttention`` has one ``embed_dim`` for its query,
its projections and its output, so all of them form one group; its key and value channels belong to
that group too when it has one fused input projection, and form their own groups (``kdim``,
``vdim``) when it has separate ones.
"""

from __future__ import annotations

import operator

from torch import nn

try:  # torchvision is optional at load time (a saved checkpoint reloads without it)
    from torchvision.models import swin_transformer as _swin
except ImportError:  # pragma: no cover - exercised by the no-torchvision checkpoint test
    _swin = None

from ..context import BuildCtx, RewriteCtx
from ._registry import function_rule, module_rule


def _weights_used(ctx: BuildCtx) -> bool:
    """Whether the attention weights (a per-head tensor unless need_weights=False) reach any op."""
    if ctx.arg(4, "need_weights", True) is False:
        return False
    return any(u.target is operator.getitem and u.args[1] == 1 and u.users for u in ctx.node.users)


def _fix_mha(m: nn.MultiheadAttention, ctx: RewriteCtx) -> None:
    e = m.out_proj.weight.shape[0]
    m.num_heads = e // m.head_dim
    m.embed_dim = e
    if m._qkv_same_embed_dim:
        m.kdim = m.vdim = e
    else:
        m.kdim, m.vdim = m.k_proj_weight.shape[1], m.v_proj_weight.shape[1]
    m.out_proj.in_features = m.out_proj.out_features = e


@module_rule(nn.MultiheadAttention, fix=_fix_mha)
def multihead_attention(ctx: BuildCtx) -> None:
    """Self- or cross-attention. The embed dim (query channels, every projection's output rows, the
    output) is pruned by whole heads; with ``kdim``/``vdim`` (separate projection weights) the key and
    value channels are groups of their own, pruned with the columns of ``k_proj_weight``/``v_proj_weight``."""
    m = ctx.module
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    if m.bias_k is not None or m.add_zero_attn or _weights_used(ctx) or not all(ctx.is_tensor(t) for t in (q, k, v)):
        return
    emb = ctx.sp(q, -1)
    if m._qkv_same_embed_dim:  # one (3E, E) weight: its columns are the channels of query, key and value
        cols = ctx.p("in_proj_weight", 1)
        for t in (q, k, v):
            ctx.identity(ctx.sp(t, -1), cols)
        ctx.table.strided(emb, ctx.p("in_proj_weight", 0))  # q, k, v blocks of E rows each
    else:
        ctx.identity(emb, ctx.p("q_proj_weight", 1))
        ctx.identity(ctx.sp(k, -1), ctx.p("k_proj_weight", 1))  # kdim
        ctx.identity(ctx.sp(v, -1), ctx.p("v_proj_weight", 1))  # vdim
        for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            ctx.identity(emb, ctx.p(name, 0))
    if m.in_proj_bias is not None:
        ctx.table.strided(emb, ctx.p("in_proj_bias", 0))
    ctx.identity(emb, ctx.p("out_proj.weight", 1))
    ctx.identity(emb, ctx.p("out_proj.weight", 0))  # one embed_dim for input and output
    if m.out_proj.bias is not None:
        ctx.identity(ctx.p("out_proj.bias", 0), emb)
    ctx.table.tie_blocks(emb, m.head_dim)
    out = (0,)
    ctx.identity(emb, ctx.out(-1, out))
    for d in range(ctx.val(q).dim() - 1):
        ctx.identity(ctx.sp(q, d), ctx.out(d, out))


# -- torchvision Swin ----------------------------------------------------------------------

if _swin is not None:


    @function_rule(_swin._patch_merging_pad)
    def swin_patch_merging_pad(ctx: BuildCtx) -> None:
        x = ctx.input
        nd = ctx.val(x).dim()
        for d in range(nd - 3):
            ctx.identity(ctx.sp(x, d), ctx.out(d))
        ctx.table.strided(ctx.sp(x, -1), ctx.out(-1))  # cat of four strided views of the same channels


    @function_rule(_swin._get_relative_position_bias)
    def swin_relative_position_bias(ctx: BuildCtx) -> None:
        table = ctx.arg(0, "relative_position_bias_table")
        if ctx.is_tensor(table) and ctx.val(table).dim() == 2:
            ctx.identity(ctx.sp(table, 1), ctx.out(1))  # heads


    def _rewrite_swin_attention(ctx: RewriteCtx) -> None:
        x = ctx.old.args[0]
        heads = ctx.old_arg(5, "num_heads")
        c = x.meta["val"].shape[-1]
        ctx.set_arg(5, "num_heads", ctx.new_size(x, -1) // (c // heads))


    @function_rule(_swin.shifted_window_attention, rewrite=_rewrite_swin_attention)
    def swin_window_attention(ctx: BuildCtx) -> None:
        x, qkv_w, proj_w = ctx.arg(0, "input"), ctx.arg(1, "qkv_weight"), ctx.arg(2, "proj_weight")
        bias = ctx.arg(3, "relative_position_bias")
        heads = ctx.arg(5, "num_heads")
        qkv_b, proj_b = ctx.arg(9, "qkv_bias", None), ctx.arg(10, "proj_bias", None)
        logit_scale = ctx.arg(11, "logit_scale", None)
        if not all(ctx.is_tensor(t) for t in (x, qkv_w, proj_w, bias)) or not isinstance(heads, int):
            return
        c = ctx.sp(x, -1)
        ctx.identity(c, ctx.sp(qkv_w, 1))
        ctx.table.strided(c, ctx.sp(qkv_w, 0))
        if ctx.is_tensor(qkv_b):
            ctx.identity(ctx.sp(qkv_b, 0), ctx.sp(qkv_w, 0))
        ctx.identity(c, ctx.sp(proj_w, 1))  # internal width is the input width
        ctx.table.block(ctx.sp(bias, 1), c)  # one bias plane per head
        if ctx.is_tensor(logit_scale):
            ctx.identity(ctx.sp(logit_scale, 0), ctx.sp(bias, 1))
        ctx.identity(ctx.sp(proj_w, 0), ctx.out(-1))
        if ctx.is_tensor(proj_b):
            ctx.identity(ctx.sp(proj_b, 0), ctx.out(-1))
        ctx.identity(ctx.sp(x, 0), ctx.out(0))
