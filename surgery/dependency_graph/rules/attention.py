"""Attention: ``nn.MultiheadAttention`` (leaf), ``F.multi_head_attention_forward`` and torchvision's
Swin window attention.

All are pruned by whole heads: the attention scale ``1/sqrt(head_dim)`` stays the same, so the
pruned model equals the masked one. ``nn.MultiheadAttention`` has one ``embed_dim`` for its query,
its projections and its output, so all of them form one group; its key and value channels belong to
that group too when it has one fused input projection, and form their own groups (``kdim``,
``vdim``) when it has separate ones.
"""

from __future__ import annotations

import operator

import torch.nn.functional as F
from torch import nn

try:  # torchvision is optional at load time (a saved checkpoint reloads without it)
    from torchvision.models import swin_transformer as _swin
except ImportError:  # pragma: no cover - exercised by the no-torchvision checkpoint test
    _swin = None

from ..context import BuildCtx, RewriteCtx
from ._registry import function_rule, module_rule


def _weights_used(ctx: BuildCtx, index: int = 4) -> bool:
    """Whether the attention weights (a per-head tensor unless need_weights=False) reach any op."""
    if ctx.arg(index, "need_weights", True) is False:
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


def _couple_mha(ctx: BuildCtx, q, k, v, head_dim: int, fused: bool, param) -> None:
    """The coupling of the MHA module and of ``F.multi_head_attention_forward``.

    ``param(name, dim)`` is the space of a dim of one of the attention's tensors (named as the module's:
    ``in_proj_weight``, ``q_proj_weight``, ``out_proj.weight``, ...), or None where it has none.
    """
    emb = ctx.sp(q, -1)
    if fused:  # one (3E, E) weight: its columns are the channels of query, key and value
        cols = param("in_proj_weight", 1)
        for t in (q, k, v):
            ctx.identity(ctx.sp(t, -1), cols)
        ctx.table.strided(emb, param("in_proj_weight", 0))  # q, k, v blocks of E rows each
    else:
        ctx.identity(emb, param("q_proj_weight", 1))
        ctx.identity(ctx.sp(k, -1), param("k_proj_weight", 1))  # kdim
        ctx.identity(ctx.sp(v, -1), param("v_proj_weight", 1))  # vdim
        for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            ctx.identity(emb, param(name, 0))
    if param("in_proj_bias", 0) is not None:
        ctx.table.strided(emb, param("in_proj_bias", 0))
    ctx.identity(emb, param("out_proj.weight", 1))
    ctx.identity(emb, param("out_proj.weight", 0))  # one embed_dim for input and output
    if param("out_proj.bias", 0) is not None:
        ctx.identity(param("out_proj.bias", 0), emb)
    ctx.table.tie_blocks(emb, head_dim)
    out = (0,)
    ctx.identity(emb, ctx.out(-1, out))
    for d in range(ctx.val(q).dim() - 1):
        ctx.identity(ctx.sp(q, d), ctx.out(d, out))


@module_rule(nn.MultiheadAttention, fix=_fix_mha)
def multihead_attention(ctx: BuildCtx) -> None:
    """Self- or cross-attention. The embed dim (query channels, every projection's output rows, the
    output) is pruned by whole heads; with ``kdim``/``vdim`` (separate projection weights) the key and
    value channels are groups of their own, pruned with the columns of ``k_proj_weight``/``v_proj_weight``."""
    m = ctx.module
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    if m.bias_k is not None or m.add_zero_attn or _weights_used(ctx) or not all(ctx.is_tensor(t) for t in (q, k, v)):
        return
    _couple_mha(ctx, q, k, v, m.head_dim, m._qkv_same_embed_dim,
                lambda name, dim: ctx.p(name, dim) if ctx.has(name) else None)


# -- functional multi-head attention --------------------------------------------------------

#: the tensors of ``F.multi_head_attention_forward`` by the module's names
_MHA_TENSORS = {
    "in_proj_weight": "in_proj_weight", "in_proj_bias": "in_proj_bias", "out_proj.weight": "out_proj_weight",
    "out_proj.bias": "out_proj_bias", "q_proj_weight": "q_proj_weight", "k_proj_weight": "k_proj_weight",
    "v_proj_weight": "v_proj_weight",
}


def _rewrite_functional_mha(ctx: RewriteCtx) -> None:
    q = ctx.old_arg(0, "query")
    embed, heads = ctx.old_arg(3, "embed_dim_to_check"), ctx.old_arg(4, "num_heads")
    new = ctx.new_size(q, -1)
    ctx.set_arg(3, "embed_dim_to_check", new)
    ctx.set_arg(4, "num_heads", new // (embed // heads))


@function_rule(F.multi_head_attention_forward, rewrite=_rewrite_functional_mha)
def functional_multihead_attention(ctx: BuildCtx) -> None:
    """``F.multi_head_attention_forward``: the module rule's coupling on the tensors passed in; the
    embed dim goes by whole heads and ``embed_dim_to_check`` / ``num_heads`` are rewritten."""
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    embed, heads = ctx.arg(3, "embed_dim_to_check"), ctx.arg(4, "num_heads")
    if not all(ctx.is_tensor(t) for t in (q, k, v)) or not (isinstance(embed, int) and isinstance(heads, int)):
        return
    if any(ctx.arg(i, n, None) is not None for i, n in ((7, "bias_k"), (8, "bias_v"), (21, "static_k"), (22, "static_v"))):
        return
    if ctx.arg(9, "add_zero_attn", False) or _weights_used(ctx, 15) or embed % heads:
        return
    separate = bool(ctx.arg(17, "use_separate_proj_weight", False))
    given = {name: ctx.arg(None, arg, None) for name, arg in _MHA_TENSORS.items()}
    if not all(t is None or ctx.is_tensor(t) for t in given.values()):
        return
    needed = ("q_proj_weight", "k_proj_weight", "v_proj_weight") if separate else ("in_proj_weight",)
    if any(given[n] is None for n in (*needed, "out_proj.weight")):
        return
    _couple_mha(ctx, q, k, v, embed // heads, not separate,
                lambda name, dim: ctx.sp(given[name], dim) if given[name] is not None else None)


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
