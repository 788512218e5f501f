"""Caffe models (``deploy.prototxt`` + ``.caffemodel``) as ``torch.fx.GraphModule``s of ``torch.nn`` modules.

Read with ``protobuf`` alone (see :mod:`.schema`): no Caffe, no ``protoc``. The result is an fx
graph whose modules are named after the Caffe layers (sanitised: ``conv1/3x3`` -> ``conv1_3x3``),
so the fx front end traces and prunes it like any PyTorch model, and checkpoints save it.
``module.meta["caffe"]`` holds the input names and shapes the prototxt declares.

Supported layers: Convolution, Deconvolution, InnerProduct, Pooling (MAX/AVE, global), ReLU,
PReLU, Sigmoid, TanH, ELU, BNLL, AbsVal, BatchNorm (a following Scale is folded into its affine),
Scale, Bias, Eltwise, Concat, Slice, Split, Crop, Flatten, Reshape, LRN (both regions), Dropout,
Softmax, Power, Input. Data, loss and accuracy layers, and layers outside the TEST phase, are
dropped. Any other layer type is a :class:`~surgery.errors.ModelLoadError` naming the layer.

Examples
--------
>>> import os, tempfile, torch
>>> path = os.path.join(tempfile.mkdtemp(), "deploy.prototxt")
>>> _ = open(path, "w").write('''
... input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
... layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
...         convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
... layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
... ''')
>>> import warnings
>>> with warnings.catch_warnings():
...     warnings.simplefilter("ignore")
...     net = load_caffe(path)
>>> net(torch.randn(1, 3, 8, 8)).shape, net.meta["caffe"]["input_shapes"]
(torch.Size([1, 4, 8, 8]), [[1, 3, 8, 8]])
"""

from __future__ import annotations

import os
import warnings

import torch.fx

from ...errors import ModelLoadError
from . import learned, plain  # noqa: F401  (register the layer builders)
from .builder import BUILDERS, NetBuilder
from .reader import deploy_layers, net_inputs, read_caffemodel, read_prototxt, weight_blobs

__all__ = ["load_caffe", "supported_layers"]


def supported_layers() -> list[str]:
    """Caffe layer types the reader builds (besides Input and the dropped data/loss layers)."""
    return sorted(BUILDERS)


def load_caffe(prototxt, weights=None) -> torch.fx.GraphModule:
    """Build the net of ``prototxt`` (a Caffe deploy file) with the blobs of ``weights`` (a ``.caffemodel``).

    Without ``weights``, parameters keep PyTorch's random initialisation (with a warning), as do
    layers the caffemodel has no blobs for. Raises :class:`~surgery.errors.ModelLoadError` with one
    line for an unreadable file, an unsupported layer, or blobs that do not fit the prototxt.
    """
    path = os.fspath(prototxt)
    net = read_prototxt(path)
    layers = deploy_layers(net)
    inputs, layers = net_inputs(net, layers, path)
    wpath = os.fspath(weights) if weights is not None else None
    stored = weight_blobs(read_caffemodel(wpath), wpath) if wpath is not None else None
    names = {layer.name for layer in layers}
    if stored is not None and not names & set(stored):
        raise ModelLoadError(f"weights {wpath}: no layer name in common with {path} (is it this net's caffemodel?)")
    builder = NetBuilder(path, layers, stored, wpath)
    for blob, shape in inputs:
        builder.input(blob, shape)
    for index, layer in enumerate(layers):
        builder.index = index
        build = BUILDERS.get(layer.type)
        if build is None:
            raise ModelLoadError(f"{path}: layer {layer.name!r} has unsupported type {layer.type!r} "
                                 f"(supported: {', '.join(supported_layers())})")
        build(builder, layer)
        builder.check_unused(layer)
    gm = builder.finish(_class_name(net.name))
    gm.meta["caffe"] = {"input_names": [b for b, _ in inputs], "input_shapes": [list(s) for _, s in inputs],
                        "prototxt": path, "weights": wpath, "modules": dict(builder.layer_modules)}
    if wpath is None and builder.unweighted:
        warnings.warn(f"{path}: no weights given; parameters are initialised randomly", stacklevel=2)
    elif builder.unweighted:
        shown = ", ".join(builder.unweighted[:5]) + (", ..." if len(builder.unweighted) > 5 else "")
        warnings.warn(f"weights {wpath} hold no blobs for {len(builder.unweighted)} layer(s) ({shown}); "
                      f"they are initialised randomly", stacklevel=2)
    return gm


def _class_name(name: str) -> str:
    text = "".join(part[:1].upper() + part[1:] for part in name.replace("-", "_").split("_") if part)
    return text if text.isidentifier() else "CaffeNet"
