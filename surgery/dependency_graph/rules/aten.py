"""The same op rules for the aten-level graphs that ``torch.export`` produces (second front end).

Rules read arguments by name (``arguments.py`` binds each aten overload to its schema), so the aten
overloads reuse the torch-function rules, with a parameter renamed where the schema's name differs
(``embedding(weight, indices)``); the few that differ in meaning (batch norm, slice, split) have small
rules here.
Every overload listed here reuses the rule of the torch function it comes from: upsampling and padding
(``pooling.py``), transposed convs (``conv_transpose.py``), casts and dropouts (``elementwise.py``,
``casts.py``), ``_weight_norm`` (``weight_norm.py``) and ``index.Tensor`` (``slicing.py``).
"""

from __future__ import annotations

import torch

from ..context import BuildCtx, RewriteCtx
from . import casts, conv, conv_transpose, elementwise, linear, norm, pooling, reduce, shape, slicing, weight_norm
from ._registry import aten_ops, function_rule

aten = torch.ops.aten




for _n, _name in ((1, "conv1d"), (2, "conv2d"), (3, "conv3d")):
    function_rule(*aten_ops(_name), rewrite=conv.rewrite_functional_conv)(conv.FUNCTIONAL_CONV[_n])
for _n in (1, 2, 3):  # conv_transpose1d has only .default, 2d and 3d have .input
    function_rule(*aten_ops(f"conv_transpose{_n}d", f"conv_transpose{_n}d.input"),
                  rewrite=conv_transpose.rewrite_functional_conv_transpose)(conv_transpose.FUNCTIONAL_CONV_TRANSPOSE[_n])
function_rule(*aten_ops("_weight_norm"), aliases={"dim": "except_dim"})(weight_norm.weight_norm)  # dim -1: no dim
function_rule(*aten_ops("linear"))(linear.functional_linear)
function_rule(*aten_ops("embedding"), aliases={"indices": "input"})(linear.functional_embedding)  # (weight, indices)

function_rule(*aten_ops(
    "relu", "relu_", "gelu", "silu", "silu_", "sigmoid", "tanh", "hardswish", "hardswish_", "hardsigmoid",
    "hardtanh", "hardtanh_", "dropout", "clone", "alias", "detach", "elu", "leaky_relu", "mish", "exp", "neg",
    "sqrt", "rsqrt", "abs", "clamp", "clamp_min", "clamp_max", "cos", "sin", "_to_copy", "contiguous", "to.dtype", "to.dtype_layout", "to.device",
    "dropout_", "feature_dropout", "feature_dropout_", "alpha_dropout", "alpha_dropout_", "feature_alpha_dropout",
    "feature_alpha_dropout_",
))(elementwise.elementwise_unary)
function_rule(*aten_ops("type_as", "to.other"))(casts.cast_like)
function_rule(*aten_ops(
    "add.Tensor", "add_.Tensor", "sub.Tensor", "mul.Tensor", "mul_.Tensor", "div.Tensor", "add.Scalar",
    "mul.Scalar", "sub.Scalar", "div.Scalar", "pow.Tensor_Scalar", "where.self", "maximum", "minimum",
    "where.ScalarOther", "where.ScalarSelf", "masked_fill.Scalar", "masked_fill.Tensor",  # T5's masked position bias
    "clamp.Tensor", "clamp_min.Tensor", "clamp_max.Tensor", "clip.Tensor",  # tensor bounds broadcast
))(elementwise.elementwise_broadcast)

function_rule(*aten_ops("cat"))(slicing.cat)
function_rule(*aten_ops("stack"))(slicing.stack)
function_rule(*aten_ops("view", "reshape", "_unsafe_view"), rewrite=shape._rewrite_shape)(shape.reshape)
function_rule(*aten_ops("flatten.using_ints", "unsqueeze", "squeeze.dim", "squeeze.dims", "squeeze"))(shape.reshape_no_constants)
function_rule(*aten_ops("permute", "transpose.int", "t"))(shape.permute)
function_rule(*aten_ops("expand"), rewrite=shape._rewrite_shape)(shape.expand)
function_rule(*aten_ops("unbind.int"))(slicing.unbind)
function_rule(*aten_ops("select.int"))(slicing.select)
function_rule(*aten_ops("index.Tensor"))(slicing.index_tensor)
function_rule(*aten_ops("chunk"), rewrite=slicing._rewrite_chunk_like)(slicing.chunk)
function_rule(*aten_ops("split_with_sizes"), rewrite=slicing._rewrite_split)(slicing.split)


def _rewrite_split_tensor(ctx: RewriteCtx) -> None:
    """``split.Tensor`` takes one size; unequal parts after pruning need ``split_with_sizes``."""
    x = ctx.old.args[0]
    dim = ctx.old_arg(2, "dim", 0) % x.meta["val"].dim()
    ctx.node.target = aten.split_with_sizes.default
    ctx.node.args = (ctx.node.args[0], slicing._new_part_sizes(ctx, dim), dim)
    ctx.node.kwargs = {}


function_rule(*aten_ops("split.Tensor"), rewrite=_rewrite_split_tensor)(slicing.split)

for _op, _spatial in ((aten_ops("adaptive_avg_pool2d", "max_pool2d", "avg_pool2d", "_adaptive_avg_pool2d"), 2),
                      (aten_ops("adaptive_avg_pool1d", "max_pool1d", "avg_pool1d"), 1)):
    for _o in _op:
        pooling._SPATIAL_FUNCTIONS[_o] = _spatial
    function_rule(*_op)(pooling.spatial_function)

function_rule(*aten_ops(  # channels pass through, spatial dims are produced
    "upsample_nearest1d.vec", "upsample_nearest1d.default", "upsample_nearest2d.vec", "upsample_nearest2d.default",
    "upsample_nearest3d.vec", "upsample_nearest3d.default", "_upsample_nearest_exact1d.vec",
    "_upsample_nearest_exact2d.vec", "_upsample_nearest_exact3d.vec", "upsample_linear1d.vec",
    "upsample_linear1d.default", "upsample_bilinear2d.vec", "upsample_bilinear2d.default",
    "_upsample_bilinear2d_aa.vec", "_upsample_bilinear2d_aa.default", "upsample_bicubic2d.vec",
    "upsample_bicubic2d.default", "_upsample_bicubic2d_aa.vec", "upsample_trilinear3d.vec",
    "upsample_trilinear3d.default",
))(pooling.resize)
function_rule(*aten_ops("pad", "constant_pad_nd"))(pooling.pad)
function_rule(*aten_ops(
    "reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d", "replication_pad2d",
    "replication_pad3d",
), aliases={"padding": "pad"})(pooling.pad)

function_rule(*aten_ops("mean.dim", "sum.dim_IntList", "amax", "amin", "std.dim", "std.correction", "var.dim",
                    "var.correction", "logsumexp", "linalg_vector_norm"))(reduce.reduction)
function_rule(*aten_ops("softmax.int", "_softmax", "log_softmax.int", "_log_softmax"))(reduce.softmax)
function_rule(*aten_ops("matmul", "bmm", "mm"))(reduce.matmul)
function_rule(*aten_ops("layer_norm", "rms_norm"), rewrite=norm._rewrite_layer_norm)(norm.functional_layernorm)
function_rule(*aten_ops("group_norm"), rewrite=norm._rewrite_group_norm)(norm.functional_groupnorm)


@function_rule(*aten_ops("batch_norm", "_native_batch_norm_legit_no_training"))
def aten_batch_norm(ctx: BuildCtx) -> None:
    """(input, weight, bias, running_mean, running_var, ...): per-channel parameters on dim 1."""
    x = ctx.input
    out_path = () if isinstance(ctx.out_val(), torch.Tensor) else (0,)
    ctx.same_dims(x, out_path=out_path)
    for t in ctx.node.args[1:5]:
        if ctx.is_tensor(t):
            ctx.identity(ctx.sp(t, 0), ctx.out(1, out_path))


def _rewrite_slice(ctx: RewriteCtx) -> None:
    x = ctx.old.args[0]
    dim = ctx.old_arg(1, "dim", 0) % x.meta["val"].dim()
    kept = ctx.kept(x, dim)
    if kept.all():  # this dim lost nothing (the batch, a sequence): open bounds stay open, sizes stay symbolic
        return
    if any(isinstance(a, torch.fx.Node) for a in ctx.old.args[2:4]):  # bounds are sizes: the dim is not coupled
        return
    start, end = _slice_bounds(ctx.old, kept.size)
    ctx.node.args = (ctx.node.args[0], dim, int(kept[:start].sum()), int(kept[:end].sum()), 1)


def _slice_bounds(node, size: int) -> tuple[int, int]:
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else size
    return slice(start, end).indices(size)[:2]


@function_rule(*aten_ops("slice.Tensor"), rewrite=_rewrite_slice)
def aten_slice(ctx: BuildCtx) -> None:
    x = ctx.input
    nd = ctx.val(x).dim()
    dim = ctx.arg(1, "dim", 0) % nd
    step = ctx.arg(4, "step", 1)
    for d in range(nd):  # other dims pass through, also when the bounds are sizes (``y[:, :h, :w]``)
        if d != dim:
            ctx.identity(ctx.sp(x, d), ctx.out(d))
    if any(isinstance(a, torch.fx.Node) for a in ctx.node.args[1:]):
        return
    start, end = _slice_bounds(ctx.node, ctx.val(x).shape[dim])
    if step == 1 and end > start:
        ctx.table.offset(ctx.out(dim), ctx.sp(x, dim), start)


@function_rule(*aten_ops("sym_size.int", "_assert_tensor_metadata"))
def aten_shape_reader(ctx: BuildCtx) -> None:
    elementwise.shape_reader(ctx)
