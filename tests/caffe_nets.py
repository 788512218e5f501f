"""Small Caffe nets in the style of the classic zoo, their random blobs, and numpy references.

Each :class:`Net` is a deploy prototxt, a function making its blobs (numpy, per layer name), and an
independent numpy forward pass over those blobs written from Caffe's layer definitions (explicit
convolution sums, Caffe's pooling loops with ceiling rounding and padded-window averages, the LRN
formula, BatchNorm with its scale-factor blob). :func:`write_caffemodel` stores blobs with the
reader's own schema, as V2 ``layer`` or V1 ``layers`` entries, with ``shape`` or legacy 4-D dims.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from surgery.frontends.caffe.schema import NetParameter


# -- numpy reference layers (float64) ---------------------------------------------------------
def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def conv(x, w, b=None, stride=1, pad=0, group=1, dilation=1):
    """Caffe convolution: each output is a sum over its group's input channels and kernel taps."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(pad), _pair(dilation)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, o, oh, ow))
    og = o // group
    for g in range(group):
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
                out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, w[g * og:(g + 1) * og, :, i, j])
    return out if b is None else out + b[None, :, None, None]


def deconv(x, w, b=None, stride=1, pad=0):
    """Caffe deconvolution (groups 1): scatter each input pixel times the kernel, then crop the padding."""
    (sh, sw), (ph, pw) = _pair(stride), _pair(pad)
    n, c, h, wd = x.shape
    _, o, kh, kw = w.shape
    full = np.zeros((n, o, sh * (h - 1) + kh, sw * (wd - 1) + kw))
    for i in range(h):
        for j in range(wd):
            full[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw] += np.einsum("nc,cokl->nokl", x[:, :, i, j], w)
    out = full[:, :, ph:full.shape[2] - ph, pw:full.shape[3] - pw]
    return out if b is None else out + b[None, :, None, None]


def pool_size(size, k, s, p, ceil=True):
    out = int((math.ceil if ceil else math.floor)((size + 2 * p - k) / s)) + 1
    return out - 1 if p and (out - 1) * s >= size + p else out


def pool(x, kernel, stride, pad=0, method="max", ceil=True):
    """Caffe's pooling loops: ceil-rounded output; AVE divides by the window clipped to input + pad."""
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(pad)
    n, c, h, w = x.shape
    oh, ow = pool_size(h, kh, sh, ph, ceil), pool_size(w, kw, sw, pw, ceil)
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * sh - ph, j * sw - pw
            he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
            area = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
            window = x[:, :, hs:he, ws:we]
            out[:, :, i, j] = window.max(axis=(2, 3)) if method == "max" else window.sum(axis=(2, 3)) / area
    return out


def lrn(x, size, alpha, beta, k=1.0):
    """Across channels: x / (k + alpha/size * sum of squares over ``size`` neighbouring channels)^beta."""
    c, half = x.shape[1], (size - 1) // 2
    sq = np.pad(x ** 2, ((0, 0), (half, half), (0, 0), (0, 0)))
    total = sum(sq[:, i:i + c] for i in range(size))
    return x / (k + alpha / size * total) ** beta


def batch_norm(x, mean, var, factor, eps=1e-5):
    """Caffe BatchNorm: the stored mean and variance are divided by the stored scale factor."""
    f = 0.0 if factor[0] == 0 else 1.0 / factor[0]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x - (mean * f).reshape(shape)) / np.sqrt((var * f).reshape(shape) + eps)


def channel(v, ndim=4):
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def relu(x, slope=0.0):
    return np.where(x > 0, x, x * slope)


def fc(x, w, b=None):
    y = x.reshape(x.shape[0], -1) @ w.T
    return y if b is None else y + b


def softmax(x, axis=1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# -- blobs ----------------------------------------------------------------------------------------
def _w(rng, *shape):
    fan_in = math.prod(shape[1:]) or 1
    return rng.standard_normal(shape) / math.sqrt(fan_in)


def _bn(rng, c):
    factor = rng.uniform(2.0, 5.0)
    return [rng.standard_normal(c) * 0.1 * factor, rng.uniform(0.5, 1.5, c) * factor, np.array([factor])]


def _affine(rng, c, bias=True):
    return [rng.uniform(0.5, 1.5, c)] + ([rng.standard_normal(c) * 0.1] if bias else [])


def write_caffemodel(path, blobs: dict[str, list[np.ndarray]], v1: bool = False, legacy: bool = False) -> None:
    net = NetParameter(name="written-by-test")
    for name, arrays in blobs.items():
        layer = (net.layers if v1 else net.layer).add(name=name)
        for a in arrays:
            blob = layer.blobs.add()
            if legacy:
                blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - a.ndim) + a.shape
            else:
                blob.shape.dim.extend(a.shape)
            blob.data.extend(a.astype(np.float32).ravel().tolist())
    with open(path, "wb") as f:
        f.write(net.SerializeToString())


@dataclass(frozen=True)
class Net:
    name: str
    prototxt: str
    input_shape: tuple[int, ...]
    make_blobs: Callable[[np.random.Generator], dict[str, list[np.ndarray]]]
    reference: Callable[[np.ndarray, dict], np.ndarray]
    v1: bool = False
    legacy: bool = False

    def blobs(self, seed: int = 0) -> dict[str, list[np.ndarray]]:
        """The blobs, rounded to float32 (what the caffemodel stores) and back to float64."""
        raw = self.make_blobs(np.random.default_rng(seed))
        return {k: [np.asarray(a, np.float32).astype(np.float64) for a in v] for k, v in raw.items()}


# -- AlexNet-like: grouped conv, LRN, MAX/AVE pooling with ceil, dropout, TRAIN-only layers --------------
ALEXNET = """
name: "AlexNetMini"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 32 input_dim: 32
layer { name: "train_data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        data_param { source: "train_lmdb" batch_size: 64 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 }
        convolution_param { num_output: 16 kernel_size: 5 stride: 2 pad: 2 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "norm1" type: "LRN" bottom: "conv1" top: "norm1" lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 } }
layer { name: "pool1" type: "Pooling" bottom: "norm1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2" convolution_param { num_output: 32 pad: 1 kernel_size: 3 group: 2 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "norm2" type: "LRN" bottom: "conv2" top: "norm2" lrn_param { local_size: 3 alpha: 0.3 beta: 0.75 k: 2 } }
layer { name: "pool2" type: "Pooling" bottom: "norm2" top: "pool2" pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "conv3" type: "Convolution" bottom: "pool2" top: "conv3" convolution_param { num_output: 24 pad: 1 kernel_size: 3 } }
layer { name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }
layer { name: "pool3" type: "Pooling" bottom: "conv3" top: "pool3" pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool3" top: "fc6" inner_product_param { num_output: 32 } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6" dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7" inner_product_param { num_output: 10 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc7" bottom: "label" top: "loss" include { phase: TRAIN } }
layer { name: "accuracy" type: "Accuracy" bottom: "fc7" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "prob" type: "Softmax" bottom: "fc7" top: "prob" }
"""


def _alexnet_blobs(rng):
    return {"conv1": [_w(rng, 16, 3, 5, 5), rng.standard_normal(16) * 0.1],
            "conv2": [_w(rng, 32, 8, 3, 3), rng.standard_normal(32) * 0.1],
            "conv3": [_w(rng, 24, 32, 3, 3), rng.standard_normal(24) * 0.1],
            "fc6": [_w(rng, 32, 24 * 3 * 3), rng.standard_normal(32) * 0.1],
            "fc7": [_w(rng, 10, 32), rng.standard_normal(10) * 0.1]}


def _alexnet_ref(x, b):
    y = relu(conv(x, *b["conv1"], stride=2, pad=2))
    y = pool(lrn(y, 5, 0.5, 0.75), 3, 2, method="max")
    y = relu(conv(y, *b["conv2"], pad=1, group=2))
    y = pool(lrn(y, 3, 0.3, 0.75, k=2.0), 3, 2, method="ave")
    y = pool(relu(conv(y, *b["conv3"], pad=1)), 2, 2, pad=1, method="max")
    y = relu(fc(y, *b["fc6"]))
    return softmax(fc(y, *b["fc7"]))


# -- ResNet bottleneck: BatchNorm + Scale (in place and not), Eltwise SUM with coeffs, global pooling --
def _bn_scale(name: str, blob: str, bottom: str | None = None, relu_too: bool = True) -> str:
    bottom = bottom or blob
    text = (f'layer {{ name: "bn_{name}" type: "BatchNorm" bottom: "{bottom}" top: "{blob}" '
            f'batch_norm_param {{ use_global_stats: true }} }}\n'
            f'layer {{ name: "scale_{name}" type: "Scale" bottom: "{blob}" top: "{blob}" scale_param {{ bias_term: true }} }}\n')
    return text + (f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{blob}" top: "{blob}" }}\n' if relu_too else "")


RESNET = f"""
name: "ResNet-Mini"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: 3 dim: 16 dim: 16 }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param {{ num_output: 16 kernel_size: 3 pad: 1 bias_term: false }} }}
{_bn_scale("conv1", "conv1")}
layer {{ name: "res2a_branch2a" type: "Convolution" bottom: "conv1" top: "res2a_branch2a" convolution_param {{ num_output: 8 kernel_size: 1 bias_term: false }} }}
{_bn_scale("2a", "res2a_branch2a")}
layer {{ name: "res2a_branch2b" type: "Convolution" bottom: "res2a_branch2a" top: "res2a_branch2b" convolution_param {{ num_output: 8 kernel_size: 3 pad: 1 bias_term: false }} }}
layer {{ name: "bn_2b" type: "BatchNorm" bottom: "res2a_branch2b" top: "bn2b" batch_norm_param {{ eps: 0.001 }} }}
layer {{ name: "scale_2b" type: "Scale" bottom: "bn2b" top: "scale2b" scale_param {{ bias_term: true }} }}
layer {{ name: "2b_relu" type: "ReLU" bottom: "scale2b" top: "scale2b" }}
layer {{ name: "res2a_branch2c" type: "Convolution" bottom: "scale2b" top: "res2a_branch2c" convolution_param {{ num_output: 16 kernel_size: 1 bias_term: false }} }}
{_bn_scale("2c", "res2a_branch2c", relu_too=False)}
layer {{ name: "res2a" type: "Eltwise" bottom: "conv1" bottom: "res2a_branch2c" top: "res2a" eltwise_param {{ operation: SUM coeff: 1 coeff: 0.5 }} }}
layer {{ name: "res2a_relu" type: "ReLU" bottom: "res2a" top: "res2a" }}
layer {{ name: "pool5" type: "Pooling" bottom: "res2a" top: "pool5" pooling_param {{ pool: AVE global_pooling: true }} }}
layer {{ name: "fc10" type: "InnerProduct" bottom: "pool5" top: "fc10" inner_product_param {{ num_output: 10 }} }}
"""


def _resnet_blobs(rng):
    out = {"conv1": [_w(rng, 16, 3, 3, 3)], "res2a_branch2a": [_w(rng, 8, 16, 1, 1)],
           "res2a_branch2b": [_w(rng, 8, 8, 3, 3)], "res2a_branch2c": [_w(rng, 16, 8, 1, 1)],
           "fc10": [_w(rng, 10, 16), rng.standard_normal(10) * 0.1]}
    for name, c in (("conv1", 16), ("2a", 8), ("2b", 8), ("2c", 16)):
        out[f"bn_{name}"], out[f"scale_{name}"] = _bn(rng, c), _affine(rng, c)
    return out


def _resnet_ref(x, b):
    def bn(y, name, eps=1e-5):
        g, beta = b[f"scale_{name}"]
        return batch_norm(y, *b[f"bn_{name}"], eps=eps) * channel(g) + channel(beta)

    c1 = relu(bn(conv(x, *b["conv1"], pad=1), "conv1"))
    y = relu(bn(conv(c1, *b["res2a_branch2a"]), "2a"))
    y = relu(bn(conv(y, *b["res2a_branch2b"], pad=1), "2b", eps=1e-3))
    y = bn(conv(y, *b["res2a_branch2c"]), "2c")
    y = relu(c1 + 0.5 * y)
    return fc(y.mean(axis=(2, 3)), *b["fc10"])


# -- Inception block: branches with 1x1/3x3/(1x3,3x1), pool projection, Concat, Slice, Power -----------
INCEPTION = """
name: "InceptionMini"
input: "data"
input_shape { dim: 1 dim: 3 dim: 16 dim: 16 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 16 kernel_size: 3 pad: 1 } }
layer { name: "conv1/relu" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "inception/1x1" type: "Convolution" bottom: "conv1" top: "inception/1x1" convolution_param { num_output: 8 kernel_size: 1 } }
layer { name: "inception/relu_1x1" type: "ReLU" bottom: "inception/1x1" top: "inception/1x1" }
layer { name: "inception/3x3_reduce" type: "Convolution" bottom: "conv1" top: "inception/3x3_reduce" convolution_param { num_output: 6 kernel_size: 1 } }
layer { name: "inception/relu_3x3_reduce" type: "ReLU" bottom: "inception/3x3_reduce" top: "inception/3x3_reduce" }
layer { name: "inception/3x3" type: "Convolution" bottom: "inception/3x3_reduce" top: "inception/3x3" convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "inception/relu_3x3" type: "ReLU" bottom: "inception/3x3" top: "inception/3x3" }
layer { name: "inception/5x5_reduce" type: "Convolution" bottom: "conv1" top: "inception/5x5_reduce" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "inception/1x3" type: "Convolution" bottom: "inception/5x5_reduce" top: "inception/1x3"
        convolution_param { num_output: 6 kernel_h: 1 kernel_w: 3 pad_h: 0 pad_w: 1 } }
layer { name: "inception/3x1" type: "Convolution" bottom: "inception/1x3" top: "inception/3x1"
        convolution_param { num_output: 6 kernel_h: 3 kernel_w: 1 pad_h: 1 pad_w: 0 } }
layer { name: "inception/relu_3x1" type: "ReLU" bottom: "inception/3x1" top: "inception/3x1" }
layer { name: "inception/pool" type: "Pooling" bottom: "conv1" top: "inception/pool" pooling_param { pool: MAX kernel_size: 3 stride: 1 pad: 1 } }
layer { name: "inception/pool_proj" type: "Convolution" bottom: "inception/pool" top: "inception/pool_proj" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "inception/relu_pool_proj" type: "ReLU" bottom: "inception/pool_proj" top: "inception/pool_proj" }
layer { name: "inception/output" type: "Concat" bottom: "inception/1x1" bottom: "inception/3x3" bottom: "inception/3x1"
        bottom: "inception/pool_proj" top: "inception/output" }
layer { name: "slice" type: "Slice" bottom: "inception/output" top: "part1" top: "part2" slice_param { axis: 1 slice_point: 10 } }
layer { name: "power" type: "Power" bottom: "part2" top: "part2p" power_param { power: 2 scale: 0.5 shift: 1 } }
layer { name: "concat2" type: "Concat" bottom: "part1" bottom: "part2p" top: "concat2" concat_param { axis: 1 } }
layer { name: "pool_g" type: "Pooling" bottom: "concat2" top: "pool_g" pooling_param { pool: AVE kernel_size: 4 stride: 4 } }
layer { name: "flat" type: "Flatten" bottom: "pool_g" top: "flat" }
layer { name: "classifier" type: "InnerProduct" bottom: "flat" top: "classifier" inner_product_param { num_output: 10 } }
"""


def _inception_blobs(rng):
    shapes = {"conv1": (16, 3, 3, 3), "inception/1x1": (8, 16, 1, 1), "inception/3x3_reduce": (6, 16, 1, 1),
              "inception/3x3": (8, 6, 3, 3), "inception/5x5_reduce": (4, 16, 1, 1), "inception/1x3": (6, 4, 1, 3),
              "inception/3x1": (6, 6, 3, 1), "inception/pool_proj": (4, 16, 1, 1), "classifier": (10, 26 * 16)}
    return {k: [_w(rng, *s), rng.standard_normal(s[0]) * 0.1] for k, s in shapes.items()}


def _inception_ref(x, b):
    c1 = relu(conv(x, *b["conv1"], pad=1))
    a = relu(conv(c1, *b["inception/1x1"]))
    m = relu(conv(relu(conv(c1, *b["inception/3x3_reduce"])), *b["inception/3x3"], pad=1))
    f = conv(conv(c1, *b["inception/5x5_reduce"]), *b["inception/1x3"], pad=(0, 1))
    f = relu(conv(f, *b["inception/3x1"], pad=(1, 0)))
    p = relu(conv(pool(c1, 3, 1, pad=1, method="max"), *b["inception/pool_proj"]))
    y = np.concatenate([a, m, f, p], axis=1)
    y = np.concatenate([y[:, :10], (1 + 0.5 * y[:, 10:]) ** 2], axis=1)
    return fc(pool(y, 4, 4, method="ave"), *b["classifier"])


# -- MobileNet block: depthwise (group = channels) and pointwise convs with BN + Scale, PReLU --------
MOBILENET = """
name: "MobileNetMini"
input: "data"
input_shape { dim: 1 dim: 3 dim: 32 dim: 32 }
layer { name: "conv0" type: "Convolution" bottom: "data" top: "conv0" convolution_param { num_output: 16 bias_term: false pad: 1 kernel_size: 3 stride: 2 } }
layer { name: "conv0/bn" type: "BatchNorm" bottom: "conv0" top: "conv0" }
layer { name: "conv0/scale" type: "Scale" bottom: "conv0" top: "conv0" scale_param { filler { value: 1 } bias_term: true } }
layer { name: "conv0/relu" type: "ReLU" bottom: "conv0" top: "conv0" }
layer { name: "conv1/dw" type: "Convolution" bottom: "conv0" top: "conv1/dw" convolution_param { num_output: 16 bias_term: false pad: 1 kernel_size: 3 group: 16 engine: CAFFE } }
layer { name: "conv1/dw/bn" type: "BatchNorm" bottom: "conv1/dw" top: "conv1/dw" }
layer { name: "conv1/dw/scale" type: "Scale" bottom: "conv1/dw" top: "conv1/dw" scale_param { bias_term: true } }
layer { name: "conv1/dw/relu" type: "ReLU" bottom: "conv1/dw" top: "conv1/dw" relu_param { negative_slope: 0.1 } }
layer { name: "conv1" type: "Convolution" bottom: "conv1/dw" top: "conv1" convolution_param { num_output: 32 bias_term: false kernel_size: 1 } }
layer { name: "conv1/bn" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "conv1/scale" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "conv1/prelu" type: "PReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2/dw" type: "Convolution" bottom: "conv1" top: "conv2/dw" convolution_param { num_output: 32 bias_term: false pad: 1 kernel_size: 3 stride: 2 group: 32 } }
layer { name: "conv2/dw/bn" type: "BatchNorm" bottom: "conv2/dw" top: "conv2/dw" }
layer { name: "conv2/dw/scale" type: "Scale" bottom: "conv2/dw" top: "conv2/dw" scale_param { bias_term: true } }
layer { name: "conv2/dw/relu" type: "ReLU" bottom: "conv2/dw" top: "conv2/dw" }
layer { name: "conv2" type: "Convolution" bottom: "conv2/dw" top: "conv2" convolution_param { num_output: 32 bias_term: false kernel_size: 1 } }
layer { name: "conv2/bn" type: "BatchNorm" bottom: "conv2" top: "conv2" }
layer { name: "conv2/scale" type: "Scale" bottom: "conv2" top: "conv2" scale_param { bias_term: true } }
layer { name: "conv2/relu" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool6" type: "Pooling" bottom: "conv2" top: "pool6" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc7" type: "Convolution" bottom: "pool6" top: "fc7" convolution_param { num_output: 10 kernel_size: 1 } }
layer { name: "prob" type: "Softmax" bottom: "fc7" top: "prob" }
"""


def _mobilenet_blobs(rng):
    out = {"conv0": [_w(rng, 16, 3, 3, 3)], "conv1/dw": [_w(rng, 16, 1, 3, 3)], "conv1": [_w(rng, 32, 16, 1, 1)],
           "conv2/dw": [_w(rng, 32, 1, 3, 3)], "conv2": [_w(rng, 32, 32, 1, 1)],
           "conv1/prelu": [rng.uniform(0.1, 0.3, 32)], "fc7": [_w(rng, 10, 32, 1, 1), rng.standard_normal(10) * 0.1]}
    for name, c in (("conv0", 16), ("conv1/dw", 16), ("conv1", 32), ("conv2/dw", 32), ("conv2", 32)):
        out[f"{name}/bn"], out[f"{name}/scale"] = _bn(rng, c), _affine(rng, c)
    return out


def _mobilenet_ref(x, b):
    def bn(y, name):
        g, beta = b[f"{name}/scale"]
        return batch_norm(y, *b[f"{name}/bn"]) * channel(g) + channel(beta)

    y = relu(bn(conv(x, *b["conv0"], stride=2, pad=1), "conv0"))
    y = relu(bn(conv(y, *b["conv1/dw"], pad=1, group=16), "conv1/dw"), 0.1)
    y = bn(conv(y, *b["conv1"]), "conv1")
    y = np.where(y > 0, y, y * channel(b["conv1/prelu"][0]))
    y = relu(bn(conv(y, *b["conv2/dw"], stride=2, pad=1, group=32), "conv2/dw"))
    y = relu(bn(conv(y, *b["conv2"]), "conv2"))
    y = conv(y.mean(axis=(2, 3), keepdims=True), *b["fc7"])
    return softmax(y)


# -- the rest: BatchNorm alone, ELU, standalone Scale and Bias, Deconvolution, Eltwise PROD/MAX,
#    TanH/Sigmoid, Reshape, InnerProduct with transpose ---------------------------------------------
MISC = """
name: "MiscMini"
input: "data"
input_shape { dim: 1 dim: 4 dim: 8 dim: 8 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "bn1" }
layer { name: "elu1" type: "ELU" bottom: "bn1" top: "bn1" elu_param { alpha: 0.5 } }
layer { name: "scale1" type: "Scale" bottom: "bn1" top: "scale1" scale_param { bias_term: true } }
layer { name: "bias1" type: "Bias" bottom: "scale1" top: "scale1" }
layer { name: "up" type: "Deconvolution" bottom: "scale1" top: "up" convolution_param { num_output: 6 kernel_size: 4 stride: 2 pad: 1 } }
layer { name: "tanh" type: "TanH" bottom: "up" top: "t" }
layer { name: "sigmoid" type: "Sigmoid" bottom: "up" top: "s" }
layer { name: "prod" type: "Eltwise" bottom: "t" bottom: "s" top: "prod" eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "t" bottom: "s" top: "max" eltwise_param { operation: MAX } }
layer { name: "cat" type: "Concat" bottom: "prod" bottom: "max" top: "cat" }
layer { name: "pool" type: "Pooling" bottom: "cat" top: "pool" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "reshape" type: "Reshape" bottom: "pool" top: "reshape" reshape_param { shape { dim: 0 dim: 12 dim: -1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "reshape" top: "ip" inner_product_param { num_output: 10 transpose: true } }
"""


def _misc_blobs(rng):
    return {"conv1": [_w(rng, 8, 4, 3, 3), rng.standard_normal(8) * 0.1], "bn1": _bn(rng, 8),
            "scale1": _affine(rng, 8), "bias1": [rng.standard_normal(8) * 0.1],
            "up": [_w(rng, 8, 6, 4, 4), rng.standard_normal(6) * 0.1],
            "ip": [rng.standard_normal((12 * 81, 10)) / math.sqrt(12 * 81), rng.standard_normal(10) * 0.1]}


def _misc_ref(x, b):
    y = batch_norm(conv(x, *b["conv1"], pad=1), *b["bn1"])
    y = np.where(y > 0, y, 0.5 * (np.exp(y) - 1))
    y = y * channel(b["scale1"][0]) + channel(b["scale1"][1]) + channel(b["bias1"][0])
    up = deconv(y, *b["up"], stride=2, pad=1)
    t, s = np.tanh(up), 1 / (1 + np.exp(-up))
    y = pool(np.concatenate([t * s, np.maximum(t, s)], axis=1), 3, 2, pad=1, method="ave")
    w, bias = b["ip"]
    return y.reshape(1, -1) @ w + bias


# -- V1: the old "layers" format with enum types and legacy 4-D blob dims ---------------------------
LENET_V1 = """
name: "LeNet"
input: "data"
input_dim: 1
input_dim: 1
input_dim: 20
input_dim: 20
layers { name: "mnist" type: DATA top: "data" top: "label" data_param { source: "mnist_train_lmdb" batch_size: 64 }
         include { phase: TRAIN } }
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1" blobs_lr: 1 blobs_lr: 2
         convolution_param { num_output: 8 kernel_size: 5 stride: 1 weight_filler { type: "xavier" } } }
layers { name: "pool1" type: POOLING bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { name: "conv2" type: CONVOLUTION bottom: "pool1" top: "conv2" convolution_param { num_output: 16 kernel_size: 3 } }
layers { name: "pool2" type: POOLING bottom: "conv2" top: "pool2" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { name: "ip1" type: INNER_PRODUCT bottom: "pool2" top: "ip1" inner_product_param { num_output: 32 } }
layers { name: "relu1" type: RELU bottom: "ip1" top: "ip1" }
layers { name: "ip2" type: INNER_PRODUCT bottom: "ip1" top: "ip2" inner_product_param { num_output: 10 } }
layers { name: "accuracy" type: ACCURACY bottom: "ip2" bottom: "label" top: "accuracy" include { phase: TEST } }
layers { name: "prob" type: SOFTMAX bottom: "ip2" top: "prob" }
"""


def _lenet_blobs(rng):
    return {"conv1": [_w(rng, 8, 1, 5, 5), rng.standard_normal(8) * 0.1],
            "conv2": [_w(rng, 16, 8, 3, 3), rng.standard_normal(16) * 0.1],
            "ip1": [_w(rng, 32, 16 * 3 * 3), rng.standard_normal(32) * 0.1],
            "ip2": [_w(rng, 10, 32), rng.standard_normal(10) * 0.1]}


def _lenet_ref(x, b):
    y = pool(conv(x, *b["conv1"]), 2, 2, method="max")
    y = pool(conv(y, *b["conv2"]), 2, 2, method="max")
    return softmax(fc(relu(fc(y, *b["ip1"])), *b["ip2"]))


NETS = {
    "alexnet": Net("alexnet", ALEXNET, (1, 3, 32, 32), _alexnet_blobs, _alexnet_ref),
    "resnet": Net("resnet", RESNET, (1, 3, 16, 16), _resnet_blobs, _resnet_ref),
    "inception": Net("inception", INCEPTION, (1, 3, 16, 16), _inception_blobs, _inception_ref),
    "mobilenet": Net("mobilenet", MOBILENET, (1, 3, 32, 32), _mobilenet_blobs, _mobilenet_ref),
    "misc": Net("misc", MISC, (1, 4, 8, 8), _misc_blobs, _misc_ref),
    "lenet_v1": Net("lenet_v1", LENET_V1, (1, 1, 20, 20), _lenet_blobs, _lenet_ref, v1=True, legacy=True),
}
