"""Linear layers (on the last dim, whatever the layout) and embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..context import BuildCtx, RewriteCtx
from ._registry import function_rule, module_rule


def _couple_linear(ctx: BuildCtx, x, w_out: int, w_in: int) -> None:
    nd = ctx.val(x).dim()
    ctx.same_dims(x, dims=range(nd - 1))
    ctx.identity(ctx.sp(x, -1), w_in)
    ctx.identity(w_out, ctx.out(-1))


def _fix_linear(module: nn.Linear, ctx: RewriteCtx) -> None:
    module.in_features = module.weight.shape[1]
    module.out_features = module.weight.shape[0]


@module_rule(nn.Linear, fix=_fix_linear)
def linear(ctx: BuildCtx) -> None:
    w_out = ctx.p("weight", 0)
    if ctx.module.bias is not None:
        ctx.identity(ctx.p("bias", 0), w_out)
    _couple_linear(ctx, ctx.input, w_out, ctx.p("weight", 1))


@function_rule(F.linear)
def functional_linear(ctx: BuildCtx) -> None:
    x, w = ctx.arg(0, "input"), ctx.arg(1, "weight")
    b = ctx.arg(2, "bias", None)
    if not (ctx.is_tensor(x) and ctx.is_tensor(w)) or ctx.val(w).dim() != 2:
        return
    if ctx.is_tensor(b):
        ctx.identity(ctx.sp(b, 0), ctx.sp(w, 0))
    _couple_linear(ctx, x, ctx.sp(w, 0), ctx.sp(w, 1))


def _fix_embedding(module: nn.Embedding, ctx: RewriteCtx) -> None:
    module.embedding_dim = module.weight.shape[1]


def _couple_embedding(ctx: BuildCtx, idx, w_dim: int) -> None:
    """Output = index dims + one embedding dim; the vocabulary dim (weight rows) stays whole."""
    for d in range(ctx.val(idx).dim()):
        ctx.identity(ctx.sp(idx, d), ctx.out(d))
    ctx.identity(w_dim, ctx.out(-1))


@module_rule(nn.Embedding, fix=_fix_embedding)
def embedding(ctx: BuildCtx) -> None:
    _couple_embedding(ctx, ctx.input, ctx.p("weight", 1))


@function_rule(F.embedding)
def functional_embedding(ctx: BuildCtx) -> None:
    idx, w = ctx.arg(0, "input"), ctx.arg(1, "weight")
    if ctx.is_tensor(idx) and ctx.is_tensor(w) and ctx.val(w).dim() == 2:
        _couple_embedding(ctx, idx, ctx.sp(w, 1))


__all__ = ["torch"]
