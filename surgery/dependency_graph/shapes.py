"""Shape rules for the most common layers, so tracing does not dispatch their meta kernels.

PyTorch's meta kernels for convolution and batch norm run Python decompositions (about a
millisecond a call); arithmetic on the shapes is a hundred times cheaper. Ops without a rule here
run on meta tensors as usual. Every rule returns a meta tensor or None (meaning: run the op).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["fast_module_value", "fast_function_value"]

_SAME_SHAPE = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid,
    nn.Hardswish, nn.Hardsigmoid, nn.Tanh, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout2d, nn.ELU,
    nn.Mish, nn.LayerNorm, nn.GroupNorm,
)


def _meta(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=like.dtype, device="meta")


def _pairs(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _conv_len(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv(m: nn.modules.conv._ConvNd, x: torch.Tensor):
    n = len(m.kernel_size)
    if isinstance(m.padding, str) or x.dim() != n + 2 or x.shape[1] != m.in_channels or m.transposed:
        return None
    sizes = [_conv_len(x.shape[2 + i], m.kernel_size[i], m.stride[i], m.padding[i], m.dilation[i]) for i in range(n)]
    if min(sizes) < 1:
        return None
    return _meta((x.shape[0], m.out_channels, *sizes), x)


def _pool_len(size: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    num = size + 2 * p - d * (k - 1) - 1
    out = (-(-num // s) if ceil else num // s) + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


def _pool(m, x: torch.Tensor):
    n = 2
    if x.dim() != 4:
        return None
    k, s, p = _pairs(m.kernel_size, n), _pairs(m.stride or m.kernel_size, n), _pairs(m.padding, n)
    d = _pairs(getattr(m, "dilation", 1), n)
    if getattr(m, "return_indices", False):
        return None
    sizes = [_pool_len(x.shape[2 + i], k[i], s[i], p[i], d[i], m.ceil_mode) for i in range(n)]
    return _meta((*x.shape[:2], *sizes), x) if min(sizes) >= 1 else None


def _adaptive(m, x: torch.Tensor):
    if x.dim() != 4:
        return None
    out = _pairs(m.output_size, 2)
    sizes = [x.shape[2 + i] if out[i] is None else out[i] for i in range(2)]
    return _meta((*x.shape[:2], *sizes), x)


def _linear(m: nn.Linear, x: torch.Tensor):
    if x.dim() < 1 or x.shape[-1] != m.in_features:
        return None
    return _meta((*x.shape[:-1], m.out_features), x)


def _same(m, x: torch.Tensor):
    return _meta(x.shape, x)


_MODULES = {
    nn.Conv1d: _conv, nn.Conv2d: _conv, nn.Conv3d: _conv, nn.Linear: _linear,
    nn.MaxPool2d: _pool, nn.AvgPool2d: _pool, nn.AdaptiveAvgPool2d: _adaptive, nn.AdaptiveMaxPool2d: _adaptive,
    **{t: _same for t in _SAME_SHAPE},
}


def fast_module_value(module: nn.Module, args: tuple, kwargs: dict):
    rule = _MODULES.get(type(module))
    if rule is None or kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].device.type != "meta":
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and (args[0].dim() < 2 or args[0].shape[1] != module.num_features):
        return None
    return rule(module, args[0])


def _binary(a, b):
    ta, tb = isinstance(a, torch.Tensor), isinstance(b, torch.Tensor)
    if ta and tb:
        if a.dtype != b.dtype or a.device.type != "meta" or b.device.type != "meta":
            return None
        try:
            return _meta(torch.broadcast_shapes(a.shape, b.shape), a)
        except RuntimeError:
            return None
    t, other = (a, b) if ta else (b, a)
    if isinstance(t, torch.Tensor) and t.device.type == "meta" and isinstance(other, float) and t.is_floating_point():
        return _meta(t.shape, t)
    return None


def _flatten(x, start_dim=0, end_dim=-1):
    if not isinstance(x, torch.Tensor) or x.device.type != "meta" or x.dim() == 0:
        return None
    s, e = start_dim % x.dim(), end_dim % x.dim()
    return _meta((*x.shape[:s], math.prod(x.shape[s : e + 1]), *x.shape[e + 1 :]), x)


def _unary(x, *args, **kwargs):
    if isinstance(x, torch.Tensor) and x.device.type == "meta" and not kwargs.get("inplace", False):
        return _meta(x.shape, x)
    return None


_FUNCTIONS = {
    operator.add: _binary, operator.mul: _binary, operator.sub: _binary, operator.truediv: _binary,
    torch.add: _binary, torch.mul: _binary, torch.flatten: _flatten, F.relu: _unary, torch.relu: _unary,
    torch.sigmoid: _unary, F.silu: _unary, F.gelu: _unary,
}


def fast_function_value(target, args: tuple, kwargs: dict):
    rule = _FUNCTIONS.get(target) if not isinstance(target, str) else None
    if rule is None:
        return None
    if rule is _binary:
        return _binary(*args) if len(args) == 2 and not kwargs else None
    return rule(*args, **kwargs)
