"""Mixture-of-Experts: the grouped matmul that runs every expert on its own tokens.

Hugging Face's fused experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ... under
``@use_experts_implementation``, default ``grouped_mm``) keep all experts in 3-D parameters,
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``, sort the (token, expert) pairs by expert and
compute ``out[rows of expert e] = x[rows of expert e] @ w[e]`` for ``w = param.transpose(-2, -1)``.
``torch.export`` records that as ``transformers::grouped_mm_fallback(input [S, K], weight [E, K, N],
offs [E])`` (a custom op: the fallback transformers takes while compiling float32 weights) or as
``aten._grouped_mm`` (bf16 weights, eager ``F.grouped_mm``).

The coupling is the one of a linear layer, shared by every expert: the contracted dim ``K`` of the
input is ``K`` of all experts' weights, ``N`` of all experts is the output's last dim, and the token
rows pass through. So intermediate neuron ``i`` of every expert is one channel: the layer has one
group of size ``I`` (``chunk`` splits ``2I`` into gate and up, their product couples the halves), and
the hidden size reaches every expert's ``H`` rows/columns, the router's columns and the residual.
The expert dim ``E`` stays whole: the router's top-k ids number the experts (``offs`` has one entry
per expert), so removing one would re-route tokens.

The custom op exists only once transformers is imported, so its rule is registered by name
(``named_op_rule``); surgery never imports transformers.
"""

from __future__ import annotations

import torch

from ..context import BuildCtx
from ..reasons import Reason
from ._registry import aten_ops, function_rule, named_op_rule

__all__ = ["grouped_mm", "aten_grouped_mm", "topk"]

_EXPERTS_FIXED = "an expert index: the router's top-k ids number the experts, removing one re-routes tokens"


def _couple_grouped(ctx: BuildCtx, x, w, offs) -> None:
    """``out[S, N] = x[S, K] @ w[e][K, N]`` per expert ``e``; ``offs[E]`` ends each expert's rows."""
    if not (ctx.is_tensor(x) and ctx.is_tensor(w)):
        return
    if ctx.val(x).dim() != 2 or ctx.val(w).dim() != 3 or ctx.out_val().dim() != 2:
        return  # 3-D x 3-D (batched) or 2-D x 2-D layouts: left to the default stop
    ctx.identity(ctx.sp(x, 1), ctx.sp(w, 1))
    ctx.identity(ctx.sp(w, 2), ctx.out(1))
    ctx.identity(ctx.sp(x, 0), ctx.out(0))
    ctx.stop(ctx.sp(w, 0), Reason.FIXED_DIM, _EXPERTS_FIXED)  # ``offs`` (one entry per expert) is left stopped


@named_op_rule("transformers::grouped_mm_fallback")
def grouped_mm(ctx: BuildCtx) -> None:
    """``transformers::grouped_mm_fallback(input, weight, offs)``: see the module docstring."""
    _couple_grouped(ctx, ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "offs", None))


@function_rule(*aten_ops("_grouped_mm"))
def aten_grouped_mm(ctx: BuildCtx) -> None:
    """``aten._grouped_mm(self, mat2, offs, bias, out_dtype)``: the same contraction; a per-expert
    ``bias [E, N]`` goes with the weight's ``N``."""
    x, w = ctx.arg(0, "self"), ctx.arg(1, "mat2")
    _couple_grouped(ctx, x, w, ctx.arg(2, "offs", None))
    bias = ctx.arg(3, "bias", None)
    if ctx.is_tensor(bias) and ctx.is_tensor(w) and ctx.val(bias).dim() == 2 and ctx.val(w).dim() == 3:
        ctx.identity(ctx.sp(bias, 1), ctx.sp(w, 2))
        ctx.identity(ctx.sp(bias, 0), ctx.sp(w, 0))


@function_rule(torch.topk, *aten_ops("topk"))
def topk(ctx: BuildCtx) -> None:
    """``topk(x, k, dim)`` -> ``(values, indices)``: the other dims pass through to both outputs; ``dim``
    is a choice among its entries (an MoE router picks experts by index there), so it stays whole."""
    x = ctx.input
    if not ctx.is_tensor(x) or ctx.val(x).dim() == 0:
        return
    dim = ctx.arg(2, "dim", -1) % ctx.val(x).dim()
    for path in ((0,), (1,)):
        ctx.same_dims(x, [d for d in range(ctx.val(x).dim()) if d != dim], out_path=path)
    ctx.stop(ctx.sp(x, dim), Reason.FIXED_DIM, f"top-k picks among the entries of dim {dim} by index ({ctx.node.name})")
