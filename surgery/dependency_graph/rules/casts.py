"""Ops that change neither shapes nor which entry is which: casts that read another tensor's dtype,
and the torch-level dropout functions (``torch.dropout``, ``torch.feature_dropout``, ...) that
``F.dropout*`` call and ``aten`` graphs show (``aten.py`` maps their overloads here).
"""

from __future__ import annotations

import torch

from ..context import BuildCtx
from ._registry import function_rule
from .common import unary

__all__ = ["cast_like", "dropout"]


def cast_like(ctx: BuildCtx) -> None:
    """``x.type_as(other)`` / ``x.to(other)``: identity on every dim of ``x``; ``other`` lends only
    its dtype (and device), so its dims are read, neither coupled nor stopped."""
    x, other = ctx.input, ctx.arg(1, "other", None)
    if ctx.is_tensor(x) and isinstance(ctx.out_val(), torch.Tensor):
        ctx.same_dims(x)
    if ctx.is_tensor(other) and other is not x:
        for d in range(ctx.val(other).dim()):
            ctx.table.touch(ctx.sp(other, d))


_DROPOUTS = tuple(
    f for f in (getattr(torch, name, None) for name in (
        "dropout", "dropout_", "feature_dropout", "feature_dropout_", "alpha_dropout", "alpha_dropout_",
        "feature_alpha_dropout", "feature_alpha_dropout_",
    )) if f is not None
)


@function_rule(*_DROPOUTS)
def dropout(ctx: BuildCtx) -> None:
    """Identity in eval mode (the mode surgery traces in); whole-channel dropouts too."""
    unary(ctx)
