"""Read a Caffe net: text ``.prototxt`` and binary ``.caffemodel`` into plain layer records.

``layer`` (V2) and ``layers`` (V1, enum types) nets become the same :class:`Layer` records; layers
that a deploy run would not execute are dropped: those whose ``include``/``exclude`` rules keep
them out of the TEST phase, data layers (their tops are the net's inputs in a deploy file), and
loss, accuracy and silence layers. Inputs come from ``input:`` with ``input_dim``/``input_shape``
or from ``Input`` layers. Weights are read per layer name, as float32 arrays with their shapes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from google.protobuf import message, text_format

from ...errors import ModelLoadError
from .schema import TEST_PHASE, V1_TYPE_NAMES, NetParameter

__all__ = ["Layer", "Blob", "read_prototxt", "read_caffemodel", "deploy_layers", "net_inputs", "weight_blobs"]

_DATA_TYPES = {"Data", "ImageData", "HDF5Data", "HDF5Output", "MemoryData", "WindowData", "DummyData",
               "AnnotatedData", "VideoData"}
_DROPPED_TYPES = _DATA_TYPES | {"Accuracy", "Silence", "ArgMax"}
_BLANK_LAYER = NetParameter().layer.add()


@dataclass(frozen=True)
class Layer:
    """One layer of the net: its name, V2 type string, bottoms, tops and parameter message."""

    name: str
    type: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    proto: object

    def param(self, field: str):
        """The layer's ``field`` message (``convolution_param``, ...); defaults if the format lacks it."""
        source = self.proto if field in self.proto.DESCRIPTOR.fields_by_name else _BLANK_LAYER
        return getattr(source, field)

    def has_param(self, field: str) -> bool:
        return field in self.proto.DESCRIPTOR.fields_by_name and self.proto.HasField(field)


@dataclass(frozen=True)
class Blob:
    """A stored parameter blob: float32 values and the shape the file gives them."""

    data: np.ndarray
    shape: tuple[int, ...]
    legacy: bool  # shape from num/channels/height/width (always 4 dims)


def _read(path: str, mode: str, what: str):
    if not os.path.isfile(path):
        raise ModelLoadError(f"{what} {path}: no such file")
    try:
        with open(path, mode, **({"encoding": "utf-8"} if mode == "r" else {})) as f:
            return f.read()
    except UnicodeDecodeError:
        raise ModelLoadError(f"{path}: not a text prototxt (it is not UTF-8 text)") from None
    except OSError as exc:
        raise ModelLoadError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None


def read_prototxt(path: str) -> NetParameter:
    """Parse a text prototxt; fields this reader does not model are skipped."""
    text = _read(path, "r", "prototxt")
    net = NetParameter()
    try:
        text_format.Parse(text, net, allow_unknown_field=True, allow_unknown_extension=True)
    except text_format.ParseError as exc:
        raise ModelLoadError(f"{path}: not a valid Caffe prototxt ({str(exc).splitlines()[0]})") from None
    if net.layer and net.layers:
        raise ModelLoadError(f"{path}: mixes V2 'layer' and V1 'layers' entries; a Caffe net uses one of them")
    if not net.layer and not net.layers:
        raise ModelLoadError(f"{path}: no layers (is it a Caffe net prototxt?)")
    return net


def read_caffemodel(path: str) -> NetParameter:
    """Parse a binary ``.caffemodel`` (a serialised ``NetParameter`` holding blobs)."""
    data = _read(path, "rb", "weights")
    if not data:
        raise ModelLoadError(f"weights {path} is empty")
    net = NetParameter()
    try:
        net.ParseFromString(data)
    except (message.DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"weights {path}: truncated or corrupt caffemodel ({str(exc).splitlines()[0]})") from None
    if not any(layer.blobs for layer in (*net.layer, *net.layers)):
        raise ModelLoadError(f"weights {path}: holds no layer with blobs (is it a .caffemodel?)")
    return net


def _type(proto) -> str:
    if isinstance(proto.type, str):
        return proto.type
    return V1_TYPE_NAMES.get(proto.type, f"V1 type {proto.type}")


def _meets(rule) -> bool:
    """Whether a ``NetStateRule`` holds for a deploy run: TEST phase, level 0, no stages."""
    if rule.HasField("phase") and rule.phase != TEST_PHASE:
        return False
    if rule.HasField("min_level") and rule.min_level > 0:
        return False
    if rule.HasField("max_level") and rule.max_level < 0:
        return False
    return not rule.stage


def _runs_in_test(proto) -> bool:
    if proto.include:
        return any(_meets(r) for r in proto.include)
    return not any(_meets(r) for r in proto.exclude)


def _dropped(kind: str) -> bool:
    return kind in _DROPPED_TYPES or kind.endswith("Loss")


def deploy_layers(net: NetParameter) -> list[Layer]:
    """The layers a deploy (TEST phase) run executes, in order, as :class:`Layer` records."""
    layers = []
    for proto in (net.layer or net.layers):
        kind = _type(proto)
        if not _runs_in_test(proto) or _dropped(kind):
            continue
        layers.append(Layer(proto.name, kind, tuple(proto.bottom), tuple(proto.top), proto))
    return layers


def _shape(dims, where: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in dims)
    if not shape or any(d <= 0 for d in shape):
        raise ModelLoadError(f"{where}: input shape must be positive, got {list(shape)}")
    return shape


def net_inputs(net: NetParameter, layers: list[Layer], path: str) -> tuple[list[tuple[str, tuple[int, ...]]], list[Layer]]:
    """``[(blob, shape)]`` of the net's inputs, and the layers without the ``Input`` layers."""
    inputs: list[tuple[str, tuple[int, ...]]] = []
    names = list(net.input)
    if names:
        if net.input_shape:
            if len(net.input_shape) != len(names):
                raise ModelLoadError(f"{path}: {len(names)} inputs but {len(net.input_shape)} input_shape entries")
            inputs = [(n, _shape(s.dim, path)) for n, s in zip(names, net.input_shape)]
        elif len(net.input_dim) == 4 * len(names):
            inputs = [(n, _shape(net.input_dim[4 * i: 4 * i + 4], path)) for i, n in enumerate(names)]
        else:
            raise ModelLoadError(f"{path}: input {names[0]!r} has no shape (input_shape, or 4 input_dim per input)")
    rest = []
    for layer in layers:
        if layer.type != "Input":
            rest.append(layer)
            continue
        shapes = layer.param("input_param").shape
        if len(shapes) not in (1, len(layer.tops)):
            raise ModelLoadError(f"{path}: Input layer {layer.name!r} has {len(layer.tops)} tops and {len(shapes)} shapes")
        for i, top in enumerate(layer.tops):
            inputs.append((top, _shape(shapes[min(i, len(shapes) - 1)].dim, f"{path}: Input layer {layer.name!r}")))
    if not inputs:
        raise ModelLoadError(f"{path}: declares no input (input:/input_shape or an Input layer); "
                             f"a train_val net with a Data layer needs its deploy version")
    return inputs, rest


def _blob(proto, where: str) -> Blob:
    values = proto.data if len(proto.data) else proto.double_data
    if proto.HasField("shape"):
        shape, legacy = tuple(int(d) for d in proto.shape.dim), False
    else:
        shape, legacy = (proto.num, proto.channels, proto.height, proto.width), True
    data = np.asarray(values, dtype=np.float32)
    if data.size != math.prod(shape):
        raise ModelLoadError(f"{where} holds {data.size} values for shape {list(shape)}")
    return Blob(data, shape, legacy)


def weight_blobs(net: NetParameter, path: str) -> dict[str, list[Blob]]:
    """Layer name -> its blobs, for every layer of a caffemodel that has any."""
    out = {}
    for proto in (*net.layer, *net.layers):
        if proto.blobs:
            out[proto.name] = [_blob(b, f"weights {path}: blob {i} of layer {proto.name!r}") for i, b in enumerate(proto.blobs)]
    return out
