"""Builders for Caffe layers without blobs: pooling, LRN, activations, and blob plumbing.

Caffe pools with ceiling rounding by default, and clips a last window that would start past the
input plus padding; PyTorch's ``ceil_mode`` does the same, and its ``count_include_pad`` average
divides by the window clipped to the padded input, which is Caffe's ``AVE`` divisor. Where the two
would size an output differently (a stride wider than the kernel without padding), the layer is
refused rather than computed differently. Caffe's LRN (``ACROSS_CHANNELS``) divides ``alpha`` by
``local_size`` as ``nn.LocalResponseNorm`` does; ``WITHIN_CHANNEL`` is spelled out with pooling.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from .builder import NetBuilder, builds
from .reader import Layer

__all__: list[str] = []


def _one_module(b: NetBuilder, layer: Layer, module: nn.Module) -> None:
    (x,) = b.bottoms(layer, 1)
    b.tops(layer, b.module(layer, module, x))


@builds("ReLU")
def relu(b: NetBuilder, layer: Layer) -> None:
    slope = layer.param("relu_param").negative_slope
    _one_module(b, layer, nn.LeakyReLU(slope) if slope else nn.ReLU())


@builds("Sigmoid")
def sigmoid(b: NetBuilder, layer: Layer) -> None:
    _one_module(b, layer, nn.Sigmoid())


@builds("TanH")
def tanh(b: NetBuilder, layer: Layer) -> None:
    _one_module(b, layer, nn.Tanh())


@builds("ELU")
def elu(b: NetBuilder, layer: Layer) -> None:
    _one_module(b, layer, nn.ELU(layer.param("elu_param").alpha))


@builds("BNLL")
def bnll(b: NetBuilder, layer: Layer) -> None:
    _one_module(b, layer, nn.Softplus())


@builds("AbsVal")
def absval(b: NetBuilder, layer: Layer) -> None:
    (x,) = b.bottoms(layer, 1)
    b.tops(layer, b.function(layer, torch.abs, x))


@builds("Softmax")
def softmax(b: NetBuilder, layer: Layer) -> None:
    _one_module(b, layer, nn.Softmax(dim=layer.param("softmax_param").axis))


@builds("Dropout", "Split")
def identity(b: NetBuilder, layer: Layer) -> None:
    """Dropout is the identity in a deploy net; Split hands one blob to several tops."""
    (x,) = b.bottoms(layer, 1)
    b.tops(layer, *([x] * len(layer.tops)))


@builds("Power")
def power(b: NetBuilder, layer: Layer) -> None:
    """``(shift + scale * x) ** power``."""
    (x,) = b.bottoms(layer, 1)
    p = layer.param("power_param")
    if p.scale != 1:
        x = b.function(layer, operator.mul, x, float(p.scale))
    if p.shift != 0:
        x = b.function(layer, operator.add, x, float(p.shift))
    if p.power != 1:
        x = b.function(layer, torch.pow, x, float(p.power))
    b.tops(layer, x)


@builds("LRN")
def lrn(b: NetBuilder, layer: Layer) -> None:
    """ACROSS_CHANNELS: ``nn.LocalResponseNorm``. WITHIN_CHANNEL: ``x / (1 + alpha * mean(x^2))^beta``
    over a ``local_size`` square (zero padded, the mean always over ``local_size^2``; ``k`` unused)."""
    p = layer.param("lrn_param")
    n = int(p.local_size)
    if n % 2 == 0:
        raise b.error(layer, f"local_size must be odd, got {n}")
    if p.norm_region == 0:
        _one_module(b, layer, nn.LocalResponseNorm(n, alpha=p.alpha, beta=p.beta, k=p.k))
        return
    (x,) = b.bottoms(layer, 1)
    if len(b.shape(x)) != 4:
        raise b.error(layer, f"WITHIN_CHANNEL normalises 4-D inputs, got {list(b.shape(x))}")
    mean = b.function(layer, F.avg_pool2d, b.function(layer, operator.mul, x, x), n, 1, (n - 1) // 2,
                      count_include_pad=True)
    scale = b.function(layer, operator.add, b.function(layer, operator.mul, mean, float(p.alpha)), 1.0)
    b.tops(layer, b.function(layer, operator.mul, x, b.function(layer, torch.pow, scale, -float(p.beta))))


# -- pooling --------------------------------------------------------------------------------------
def _pool_dims(b: NetBuilder, layer: Layer, p) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    if p.HasField("kernel_h") or p.HasField("kernel_w"):
        kernel = (p.kernel_h, p.kernel_w)
    elif p.HasField("kernel_size"):
        kernel = (p.kernel_size, p.kernel_size)
    else:
        raise b.error(layer, "has no kernel_size")
    stride = (p.stride_h, p.stride_w) if p.HasField("stride_h") or p.HasField("stride_w") else (p.stride, p.stride)
    pad = (p.pad_h, p.pad_w) if p.HasField("pad_h") or p.HasField("pad_w") else (p.pad, p.pad)
    return tuple(map(int, kernel)), tuple(map(int, stride)), tuple(map(int, pad))


def caffe_pool_size(size: int, kernel: int, stride: int, pad: int, ceil: bool) -> int:
    """Caffe's pooled output size along one dim."""
    rounding = math.ceil if ceil else math.floor
    out = int(rounding((size + 2 * pad - kernel) / stride)) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1  # the last window would start inside the padding only
    return out


@builds("Pooling")
def pooling(b: NetBuilder, layer: Layer) -> None:
    (x,) = b.bottoms(layer, 1)
    p = layer.param("pooling_param")
    shape = b.shape(x)
    if len(shape) != 4:
        raise b.error(layer, f"pools 4-D inputs, got {list(shape)}")
    if p.pool == 2:
        raise b.error(layer, "STOCHASTIC pooling is not supported (MAX and AVE are)")
    average = p.pool == 1
    if p.global_pooling:
        module = nn.AdaptiveAvgPool2d(1) if average else nn.AdaptiveMaxPool2d(1)
        b.tops(layer, b.module(layer, module, x))
        return
    kernel, stride, pad = _pool_dims(b, layer, p)
    if min(kernel) < 1 or min(stride) < 1:
        raise b.error(layer, f"kernel {list(kernel)} and stride {list(stride)} must be positive")
    if any(2 * q > k for q, k in zip(pad, kernel)):
        raise b.error(layer, f"padding {list(pad)} above half the kernel {list(kernel)} is not supported")
    ceil = p.round_mode == 0
    if average:
        module = nn.AvgPool2d(kernel, stride, pad, ceil_mode=ceil, count_include_pad=True)
    else:
        module = nn.MaxPool2d(kernel, stride, pad, ceil_mode=ceil)
    node = b.module(layer, module, x)
    want = tuple(caffe_pool_size(s, k, st, q, ceil) for s, k, st, q in zip(shape[2:], kernel, stride, pad))
    if tuple(b.shape(node)[2:]) != want:
        raise b.error(layer, f"Caffe pools {list(shape[2:])} to {list(want)} here, PyTorch to "
                             f"{list(b.shape(node)[2:])}; this kernel/stride/pad combination is not supported")
    b.tops(layer, node)


# -- blob plumbing --------------------------------------------------------------------------------
def _axis(b: NetBuilder, layer: Layer, axis: int, ndim: int) -> int:
    a = axis + ndim if axis < 0 else axis
    if not 0 <= a < ndim:
        raise b.error(layer, f"axis {axis} is out of range for a {ndim}-D input")
    return a


@builds("Eltwise")
def eltwise(b: NetBuilder, layer: Layer) -> None:
    xs = b.bottoms(layer, (2, None))
    p = layer.param("eltwise_param")
    coeff = list(p.coeff)
    if coeff and (p.operation != 1 or len(coeff) != len(xs)):
        raise b.error(layer, f"coeff needs operation SUM and one value per bottom ({len(xs)}), got {len(coeff)}")
    if p.operation == 1:
        terms = [x if not coeff or coeff[i] == 1 else b.function(layer, operator.mul, x, float(coeff[i]))
                 for i, x in enumerate(xs)]
        fn = operator.add
    else:
        terms, fn = xs, (operator.mul if p.operation == 0 else torch.maximum)
    out = terms[0]
    for t in terms[1:]:
        out = b.function(layer, fn, out, t)
    b.tops(layer, out)


@builds("Concat")
def concat(b: NetBuilder, layer: Layer) -> None:
    xs = b.bottoms(layer, (1, None))
    p = layer.param("concat_param")
    axis = p.axis if p.HasField("axis") or not p.HasField("concat_dim") else p.concat_dim
    axis = _axis(b, layer, axis, len(b.shape(xs[0])))
    b.tops(layer, xs[0] if len(xs) == 1 else b.function(layer, torch.cat, xs, axis))


@builds("Slice")
def slice_(b: NetBuilder, layer: Layer) -> None:
    (x,) = b.bottoms(layer, 1)
    p = layer.param("slice_param")
    shape = b.shape(x)
    axis = p.axis if p.HasField("axis") or not p.HasField("slice_dim") else p.slice_dim
    axis = _axis(b, layer, axis, len(shape))
    n, size = len(layer.tops), shape[axis]
    if p.slice_point:
        points = [0, *(int(q) for q in p.slice_point), size]
        if len(points) != n + 1 or any(a >= c for a, c in zip(points, points[1:])):
            raise b.error(layer, f"slice_point {list(p.slice_point)} does not cut {size} into {n} parts")
        sizes = [c - a for a, c in zip(points, points[1:])]
    elif size % n:
        raise b.error(layer, f"cannot slice {size} into {n} equal parts")
    else:
        sizes = [size // n] * n
    if n == 1:
        b.tops(layer, x)
        return
    parts = b.function(layer, torch.split, x, sizes, axis)
    b.tops(layer, *(b.function(layer, operator.getitem, parts, i) for i in range(n)))


@builds("Flatten")
def flatten(b: NetBuilder, layer: Layer) -> None:
    (x,) = b.bottoms(layer, 1)
    p = layer.param("flatten_param")
    ndim = len(b.shape(x))
    start, end = _axis(b, layer, p.axis, ndim), _axis(b, layer, p.end_axis, ndim)
    b.tops(layer, x if start >= end else b.function(layer, torch.flatten, x, start, end))


@builds("Reshape")
def reshape(b: NetBuilder, layer: Layer) -> None:
    """Caffe's reshape spec: ``0`` copies an input dim, ``-1`` is inferred; the batch dim stays free."""
    (x,) = b.bottoms(layer, 1)
    p = layer.param("reshape_param")
    shape = b.shape(x)
    spec = [int(d) for d in p.shape.dim]
    axis = p.axis + len(shape) + 1 if p.axis < 0 else p.axis
    end = len(shape) if p.num_axes == -1 else axis + p.num_axes
    if not 0 <= axis <= end <= len(shape) or spec.count(-1) > 1:
        raise b.error(layer, f"reshape spec {spec} (axis {p.axis}, num_axes {p.num_axes}) does not fit input {list(shape)}")
    middle = [shape[axis + i] if d == 0 else d for i, d in enumerate(spec)]
    dims = [*shape[:axis], *middle, *shape[end:]]
    known = math.prod(d for d in dims if d != -1)
    if -1 in dims:
        if known == 0 or math.prod(shape) % known:
            raise b.error(layer, f"cannot infer -1 in reshape spec {spec} for input {list(shape)}")
        dims[dims.index(-1)] = math.prod(shape) // known
    if math.prod(dims) != math.prod(shape) or any(d <= 0 for d in dims):
        raise b.error(layer, f"reshape spec {spec} gives {dims}, which does not hold input {list(shape)}")
    batch_copied = axis > 0 or (spec and spec[0] == 0)
    target = [b.method(layer, "size", x, 0) if batch_copied else dims[0], *dims[1:]]
    b.tops(layer, b.method(layer, "reshape", x, *target))


@builds("Crop")
def crop(b: NetBuilder, layer: Layer) -> None:
    """The first bottom cut to the second's shape in every dim from ``axis`` on, from ``offset``."""
    x, like = b.bottoms(layer, 2)
    p = layer.param("crop_param")
    shape, target = b.shape(x), b.shape(like)
    if len(shape) != len(target):
        raise b.error(layer, f"crops {list(shape)} to a blob of another rank, {list(target)}")
    axis = _axis(b, layer, p.axis, len(shape))
    offsets = [int(o) for o in p.offset] or [0]
    if len(offsets) not in (1, len(shape) - axis):
        raise b.error(layer, f"gives {len(offsets)} offsets for {len(shape) - axis} cropped dims")
    offsets = offsets * (len(shape) - axis) if len(offsets) == 1 else offsets
    index = [slice(None)] * axis
    for d, o in zip(range(axis, len(shape)), offsets):
        if o + target[d] > shape[d]:
            raise b.error(layer, f"offset {o} + size {target[d]} exceeds {shape[d]} in dim {d}")
        index.append(slice(o, o + target[d]) if (o, target[d]) != (0, shape[d]) else slice(None))
    b.tops(layer, b.function(layer, operator.getitem, x, tuple(index)))
