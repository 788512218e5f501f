"""Builders for Caffe layers that hold blobs: convolutions, inner product, BatchNorm (+ Scale), PReLU.

Weight layouts match PyTorch's (``out x in/groups x kh x kw`` for Convolution, ``in x out/groups x
kh x kw`` for Deconvolution, ``out x in`` for InnerProduct unless ``transpose``). Caffe's BatchNorm
stores running sums with a third blob, the factor they are divided by; it has no affine, which the
``Scale`` layer that usually follows supplies: that Scale is folded into the BatchNorm's affine.
"""

from __future__ import annotations

import torch
from torch import nn

from ...layers import Affine
from .builder import NetBuilder, builds, count
from .reader import Layer

__all__: list[str] = []

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_DECONV = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BATCHNORM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _load(module: nn.Module, names: list[str], blobs: list[torch.Tensor] | None) -> None:
    if blobs is None:
        return
    with torch.no_grad():
        for name, blob in zip(names, blobs):
            getattr(module, name).copy_(blob)


def _spatial(b: NetBuilder, layer: Layer, p, name: str, n: int, default: int | None) -> tuple[int, ...]:
    """``kernel``/``stride``/``pad``/``dilation`` for ``n`` spatial dims: the ``_h``/``_w`` pair (2-D)
    if either is set, else the repeated field (one value for every dim, or one per dim)."""
    h, w = f"{name}_h", f"{name}_w"
    if h in p.DESCRIPTOR.fields_by_name and (p.HasField(h) or p.HasField(w)):
        if n != 2:
            raise b.error(layer, f"{h}/{w} only apply to 2-D convolutions")
        return int(getattr(p, h)), int(getattr(p, w))
    field = "kernel_size" if name == "kernel" else name
    values = [int(v) for v in getattr(p, field)]
    if not values:
        if default is None:
            raise b.error(layer, f"has no {field}")
        values = [default]
    if len(values) not in (1, n):
        raise b.error(layer, f"gives {len(values)} {field} values for {n} spatial dims")
    return tuple(values * n if len(values) == 1 else values)


def _conv(b: NetBuilder, layer: Layer, transposed: bool) -> None:
    (x,) = b.bottoms(layer, 1)
    p = layer.param("convolution_param")
    shape = b.shape(x)
    n = len(shape) - 2
    if p.axis not in (1, 1 - len(shape)) or n not in _CONV:
        raise b.error(layer, f"only channel axis 1 with 1 to 3 spatial dims is supported (input {list(shape)})")
    if not p.HasField("num_output"):
        raise b.error(layer, "has no num_output")
    cin, cout, groups = shape[1], int(p.num_output), int(p.group)
    if groups < 1 or cin % groups or cout % groups:
        raise b.error(layer, f"group {groups} does not divide {cin} input and {cout} output channels")
    k = _spatial(b, layer, p, "kernel", n, None)
    stride, pad = _spatial(b, layer, p, "stride", n, 1), _spatial(b, layer, p, "pad", n, 0)
    dilation = _spatial(b, layer, p, "dilation", n, 1)
    cls = (_DECONV if transposed else _CONV)[n]
    module = cls(cin, cout, k, stride=stride, padding=pad, dilation=dilation, groups=groups, bias=p.bias_term)
    shapes = [tuple(module.weight.shape)] + ([(cout,)] if p.bias_term else [])
    _load(module, ["weight", "bias"], b.blobs_for(layer, shapes))
    b.tops(layer, b.module(layer, module, x))


@builds("Convolution")
def convolution(b: NetBuilder, layer: Layer) -> None:
    _conv(b, layer, transposed=False)


@builds("Deconvolution")
def deconvolution(b: NetBuilder, layer: Layer) -> None:
    _conv(b, layer, transposed=True)


@builds("InnerProduct")
def inner_product(b: NetBuilder, layer: Layer) -> None:
    """``y = x W^T + b`` over the dims from ``axis`` on, flattened (``transpose``: W is stored ``in x out``)."""
    (x,) = b.bottoms(layer, 1)
    p = layer.param("inner_product_param")
    shape = b.shape(x)
    axis = p.axis + len(shape) if p.axis < 0 else p.axis
    if not 0 <= axis < len(shape):
        raise b.error(layer, f"axis {p.axis} is out of range for input {list(shape)}")
    if not p.HasField("num_output"):
        raise b.error(layer, "has no num_output")
    k, n = count(shape[axis:]), int(p.num_output)
    module = nn.Linear(k, n, bias=p.bias_term)
    shapes = [(k, n) if p.transpose else (n, k)] + ([(n,)] if p.bias_term else [])
    blobs = b.blobs_for(layer, shapes)
    if blobs is not None and p.transpose:
        blobs[0] = blobs[0].t().contiguous()
    _load(module, ["weight", "bias"], blobs)
    if axis != len(shape) - 1:
        x = b.function(layer, torch.flatten, x, axis)
    b.tops(layer, b.module(layer, module, x))


@builds("BatchNorm")
def batch_norm(b: NetBuilder, layer: Layer) -> None:
    """Normalise with the stored mean and variance, each divided by the stored scale factor."""
    (x,) = b.bottoms(layer, 1)
    p = layer.param("batch_norm_param")
    shape = b.shape(x)
    if len(shape) not in _BATCHNORM:
        raise b.error(layer, f"takes a 2-D to 5-D input, got {list(shape)}")
    c = shape[1]
    global_stats = p.use_global_stats if p.HasField("use_global_stats") else True  # TEST phase default
    module = _BATCHNORM[len(shape)](c, eps=p.eps, affine=False, track_running_stats=global_stats)
    blobs = b.blobs_for(layer, [(c,), (c,), (1,)])
    if blobs is not None and global_stats:
        factor = float(blobs[2][0])
        factor = 0.0 if factor == 0 else 1.0 / factor
        _load(module, ["running_mean", "running_var"], [blobs[0] * factor, blobs[1] * factor])
    b.tops(layer, b.module(layer, module, x))


def _param_shape(b: NetBuilder, layer: Layer, p, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a Scale/Bias blob: the input dims ``axis .. axis+num_axes``."""
    axis = p.axis + len(shape) if p.axis < 0 else p.axis
    end = len(shape) if p.num_axes == -1 else axis + p.num_axes
    if not 0 <= axis <= end <= len(shape):
        raise b.error(layer, f"axis {p.axis} and num_axes {p.num_axes} do not fit input {list(shape)}")
    return tuple(shape[axis:end]) + (1,) * (len(shape) - end)


def _fold_into_batchnorm(b: NetBuilder, layer: Layer, x, p) -> bool:
    """Fold a one-bottom, per-channel Scale into the BatchNorm that feeds only it."""
    if x.op != "call_module" or len(x.users) or len(layer.tops) != 1:
        return False
    bn = b.modules[x.target]
    if type(bn) not in _BATCHNORM.values() or bn.affine or p.axis != 1 or p.num_axes != 1:
        return False
    source = layer.bottoms[0]
    if layer.tops[0] != source and b.read_later(source):
        return False  # the un-scaled blob is read again later: keep the layers apart
    c = bn.num_features
    blobs = b.blobs_for(layer, [(c,)] + ([(c,)] if p.bias_term else []))
    bn.affine = True
    bn.weight = nn.Parameter(torch.ones(c))
    bn.bias = nn.Parameter(torch.zeros(c))
    _load(bn, ["weight", "bias"], blobs)
    b.tops(layer, x)
    return True


@builds("Scale")
def scale(b: NetBuilder, layer: Layer) -> None:
    """``x * gamma (+ beta)``; gamma is a learned blob (one bottom) or the second bottom."""
    xs = b.bottoms(layer, (1, 2))
    p = layer.param("scale_param")
    shape = b.shape(xs[0])
    if len(xs) == 1:
        if _fold_into_batchnorm(b, layer, xs[0], p):
            return
        pshape = _param_shape(b, layer, p, shape)
        module = Affine(pshape, weight=True, bias=p.bias_term)
        blobs = b.blobs_for(layer, [_blob_shape(pshape, shape, p)] * (1 + p.bias_term))
        _load(module, ["weight", "bias"], None if blobs is None else [t.reshape(pshape) for t in blobs])
        b.tops(layer, b.module(layer, module, xs[0]))
        return
    y = _broadcast_from(b, layer, xs[1], p.axis, shape)
    out = b.function(layer, torch.mul, xs[0], y)
    if p.bias_term:
        module = Affine(b.shape(y), weight=False, bias=True)
        blobs = b.blobs_for(layer, [b.shape(xs[1])])
        _load(module, ["bias"], None if blobs is None else [blobs[0].reshape(b.shape(y))])
        out = b.module(layer, module, out)
    b.tops(layer, out)


@builds("Bias")
def bias(b: NetBuilder, layer: Layer) -> None:
    """``x + beta``; beta is a learned blob (one bottom) or the second bottom."""
    xs = b.bottoms(layer, (1, 2))
    p = layer.param("bias_param")
    shape = b.shape(xs[0])
    if len(xs) == 2:
        b.tops(layer, b.function(layer, torch.add, xs[0], _broadcast_from(b, layer, xs[1], p.axis, shape)))
        return
    pshape = _param_shape(b, layer, p, shape)
    module = Affine(pshape, weight=False, bias=True)
    blobs = b.blobs_for(layer, [_blob_shape(pshape, shape, p)])
    _load(module, ["bias"], None if blobs is None else [blobs[0].reshape(pshape)])
    b.tops(layer, b.module(layer, module, xs[0]))


def _blob_shape(pshape: tuple[int, ...], shape: tuple[int, ...], p) -> tuple[int, ...]:
    """The stored blob's shape: the broadcast parameter shape without its trailing singleton dims."""
    axis = p.axis + len(shape) if p.axis < 0 else p.axis
    end = len(shape) if p.num_axes == -1 else axis + p.num_axes
    return pshape[:end - axis]


def _broadcast_from(b: NetBuilder, layer: Layer, y, axis: int, shape: tuple[int, ...]):
    """``y`` (shaped like ``shape[axis:axis+k]``) with trailing singleton dims to broadcast against ``shape``."""
    yshape = b.shape(y)
    axis = axis + len(shape) if axis < 0 else axis
    if tuple(shape[axis:axis + len(yshape)]) != yshape:
        raise b.error(layer, f"second bottom {list(yshape)} does not match input {list(shape)} from axis {axis}")
    for _ in range(len(shape) - axis - len(yshape)):
        y = b.function(layer, torch.unsqueeze, y, -1)
    return y


@builds("PReLU")
def prelu(b: NetBuilder, layer: Layer) -> None:
    (x,) = b.bottoms(layer, 1)
    shape = b.shape(x)
    c = 1 if layer.param("prelu_param").channel_shared or len(shape) < 2 else shape[1]
    module = nn.PReLU(c)
    _load(module, ["weight"], b.blobs_for(layer, [(c,)]))
    b.tops(layer, b.module(layer, module, x))
