"""Elementwise ops: activations, dropout, casts, arithmetic with broadcasting, shape readers."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..context import BuildCtx
from ._registry import function_rule, method_rule, module_rule
from .common import broadcast, op_name, tensor_args, unary
from .sizes import size_tuple_arith
from .statistics import couple_points

_UNARY_MODULES = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout,
)
_UNARY_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.sigmoid, F.tanh, F.logsigmoid,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs,
    torch.neg, torch.sin, torch.cos, torch.erf, torch.square, torch.reciprocal,
    torch.nn.functional.hardtanh_, operator.neg, operator.pos, torch.clone, torch.sign, torch.floor,
    torch.ceil, torch.round, torch.nan_to_num,
)
_UNARY_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt", "rsqrt", "abs", "neg",
    "contiguous", "clone", "detach", "float", "half", "double", "bfloat16",
    "to", "type", "type_as", "cpu", "cuda", "square", "reciprocal", "sign", "floor", "ceil", "round",
    "requires_grad_", "hardtanh_", "exp_", "nan_to_num", "cos", "sin",
)
_BINARY_FUNCTIONS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.pow, torch.maximum, torch.minimum, torch.where, torch.lerp, torch.addcmul,
    torch.masked_fill,
    # bounds may be tensors (``clamp(x, self.lo, self.hi)``, Gemma 4's clamped linears): they broadcast like add
    torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max,
)
_BINARY_METHODS = (
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "truediv", "pow", "maximum", "minimum",
    "masked_fill", "masked_fill_", "where", "lerp", "addcmul",
    "clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_max", "clamp_min_", "clamp_max_",
)


@module_rule(*_UNARY_MODULES)
@function_rule(*_UNARY_FUNCTIONS)
@method_rule(*_UNARY_METHODS)
def elementwise_unary(ctx: BuildCtx) -> None:
    unary(ctx)


@function_rule(*_BINARY_FUNCTIONS)
@method_rule(*_BINARY_METHODS)
def elementwise_broadcast(ctx: BuildCtx) -> None:
    if isinstance(ctx.out_val(), torch.Tensor):
        broadcast(ctx)
        couple_points(ctx)
    else:
        size_tuple_arith(ctx)  # ``x.size()[:-1] + (heads, head_dim)``


def _fix_prelu(module: nn.PReLU, ctx) -> None:
    module.num_parameters = module.weight.shape[0]


@module_rule(nn.PReLU, fix=_fix_prelu)
def prelu(ctx: BuildCtx) -> None:
    x = ctx.input
    ctx.same_dims(x)
    if ctx.module.num_parameters > 1:
        ctx.identity(ctx.p("weight", 0), ctx.out(1))


@function_rule(torch._assert)
@method_rule("size", "dim", "numel", "ndimension", "nelement", "get_device", "is_contiguous")
def shape_reader(ctx: BuildCtx) -> None:
    """Reads sizes at run time (always the new ones after pruning): couples and stops nothing.

    ``x.size()``, ``x.size(d)`` and ``x.shape`` remember which space each int came from, so a
    reshape that uses the int couples its output dim with that space.
    """
    for x in tensor_args(ctx):
        for d in range(x.meta["val"].dim()):
            ctx.table.touch(ctx.sp(x, d))
    node = ctx.node
    x = node.args[0] if node.args else None
    if not ctx.is_tensor(x):
        return
    nd = ctx.val(x).dim()
    name = op_name(node.target)
    if name == "size" or (name == "getattr" and node.args[1] == "shape"):
        dim = ctx.arg(1, "dim", None) if name == "size" else None
        if isinstance(dim, int):
            ctx.table.int_source[node.name] = ctx.sp(x, dim)
        elif dim is None:
            ctx.table.int_source[node.name] = tuple(ctx.sp(x, d) for d in range(nd))


@function_rule(getattr)
def attribute(ctx: BuildCtx) -> None:
    """``x.shape`` / ``x.dtype`` read sizes; ``x.T`` / ``x.mT`` permute; anything else producing a tensor stops."""
    x, name = ctx.node.args[0], ctx.node.args[1]
    out = ctx.out_val()
    if not isinstance(out, torch.Tensor):
        shape_reader(ctx)
    elif name in ("T", "mT") and ctx.is_tensor(x):
        nd = out.dim()
        perm = list(range(nd))[::-1] if name == "T" else list(range(nd - 2)) + [nd - 1, nd - 2]
        for d, src in enumerate(perm):
            ctx.identity(ctx.sp(x, src), ctx.out(d))
    elif name in ("real", "imag", "data") and ctx.is_tensor(x):
        ctx.same_dims(x)
