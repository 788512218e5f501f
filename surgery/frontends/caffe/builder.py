"""Turn Caffe layer records into a ``torch.fx.GraphModule`` of plain ``torch.nn`` modules.

A :class:`NetBuilder` walks the layers in order. Blob names map to the fx node that last wrote them,
so in-place layers (top == bottom) simply rebind their blob; a blob read by no later layer is a net
output, as in Caffe. Each layer type has a builder (registered with :func:`builds`) that adds nodes
and modules through the builder's small API; shapes are propagated on meta tensors as the graph
grows, so builders know their input shapes without running the net. Weights are matched to layers
by name and checked against the shapes the prototxt implies.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
import torch.fx
from torch import nn

from ...errors import ModelLoadError
from .reader import Blob, Layer

__all__ = ["NetBuilder", "builds", "BUILDERS"]

#: Caffe layer type -> function(builder, layer) that adds the layer to the graph.
BUILDERS: dict[str, Callable[["NetBuilder", Layer], None]] = {}
_RESERVED = set(dir(torch.fx.GraphModule)) | {"input"}


def builds(*types: str):
    """Register a layer builder for the Caffe layer ``types``; a type is registered once."""
    def deco(fn):
        for t in types:
            if t in BUILDERS:
                raise ValueError(f"Caffe layer type {t!r} already has a builder")
            BUILDERS[t] = fn
        return fn
    return deco


def _one_line(exc: BaseException) -> str:
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return first or type(exc).__name__


def _node_name(text: str) -> str:
    name = re.sub(r"\W", "_", text) or "layer"
    return f"_{name}" if name[0].isdigit() else name


def _meta_run(fn, args, kwargs=None):
    """Run ``fn`` on meta tensors (a module's own tensors are swapped for meta copies)."""
    if isinstance(fn, nn.Module):
        state = {k: torch.empty_like(v, device="meta") for k, v in (*fn.named_parameters(), *fn.named_buffers())}
        return torch.func.functional_call(fn, state, tuple(args), kwargs or {})
    return fn(*args, **(kwargs or {}))


class NetBuilder:
    """Graph under construction: blob table, modules, meta values, weights and their bookkeeping."""

    def __init__(self, path: str, layers: list[Layer], weights: dict[str, list[Blob]] | None, weights_path: str | None):
        self.path, self.layers = path, layers
        self.graph = torch.fx.Graph()
        self.modules: dict[str, nn.Module] = {}
        self.values: dict[torch.fx.Node, object] = {}
        self.blobs: dict[str, torch.fx.Node] = {}      # blob name -> node that last wrote it
        self.unread: dict[str, torch.fx.Node] = {}     # blobs no layer has read yet (the outputs)
        self.layer_modules: dict[str, str] = {}         # layer name -> module path
        self.weights, self.weights_path = weights, weights_path
        self.used_weights: set[str] = set()
        self.unweighted: list[str] = []                 # layers with parameters but no stored blobs
        self.index = 0                                  # position of the layer being built
        self._names: set[str] = set()

    # -- naming ---------------------------------------------------------------------------------
    def unique_name(self, text: str) -> str:
        """A Python identifier from a Caffe name (``conv1/3x3_s2`` -> ``conv1_3x3_s2``), unique here."""
        name = _node_name(text)
        if name in _RESERVED:
            name = f"{name}_"
        base, i = name, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def error(self, layer: Layer, text: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: layer {layer.name!r} ({layer.type}): {text}")

    # -- nodes ------------------------------------------------------------------------------------
    def input(self, blob: str, shape: tuple[int, ...]) -> None:
        node = self.graph.placeholder(self.unique_name(blob))
        self.values[node] = torch.empty(shape, device="meta")
        self.blobs[blob] = self.unread[blob] = node

    def value(self, node: torch.fx.Node):
        """The meta tensor (or tuple of them) a node produces."""
        return self.values[node]

    def shape(self, node: torch.fx.Node) -> tuple[int, ...]:
        return tuple(self.values[node].shape)

    def _unwrap(self, args):
        return torch.fx.node.map_arg(args, lambda n: self.values[n])

    def _add(self, layer: Layer, node: torch.fx.Node, fn, args, kwargs=None) -> torch.fx.Node:
        try:
            self.values[node] = _meta_run(fn, self._unwrap(args), self._unwrap(kwargs or {}))
        except Exception as exc:  # shapes that do not fit: name the layer
            raise self.error(layer, f"does not fit its input shapes ({_one_line(exc)})") from None
        return node

    def module(self, layer: Layer, module: nn.Module, *args: torch.fx.Node, name: str | None = None) -> torch.fx.Node:
        """Add ``module`` (named after the layer) called on ``args``; returns its node."""
        path = self.unique_name(name or layer.name)
        self.modules[path] = module.eval()
        self.layer_modules.setdefault(layer.name, path)
        node = self.graph.call_module(path, args)
        return self._add(layer, node, module, args)

    def function(self, layer: Layer, fn, *args, **kwargs) -> torch.fx.Node:
        node = self.graph.create_node("call_function", fn, args, kwargs, name=_node_name(layer.name))
        return self._add(layer, node, fn, args, kwargs)

    def method(self, layer: Layer, name: str, *args, **kwargs) -> torch.fx.Node:
        node = self.graph.create_node("call_method", name, args, kwargs, name=_node_name(layer.name))
        return self._add(layer, node, lambda x, *a, **k: getattr(x, name)(*a, **k), args, kwargs)

    # -- blobs ------------------------------------------------------------------------------------
    def bottoms(self, layer: Layer, count: int | tuple[int, int] | None = None) -> list[torch.fx.Node]:
        """The nodes a layer reads (marked as read), after checking how many it takes."""
        lo, hi = (count, count) if isinstance(count, int) else (count or (1, None))
        n = len(layer.bottoms)
        if n < lo or (hi is not None and n > hi):
            want = f"{lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            raise self.error(layer, f"takes {want} bottom blob(s), got {n}")
        nodes = []
        for blob in layer.bottoms:
            if blob not in self.blobs:
                raise self.error(layer, f"reads blob {blob!r}, which no earlier layer or input produces")
            self.unread.pop(blob, None)
            nodes.append(self.blobs[blob])
        return nodes

    def tops(self, layer: Layer, *nodes: torch.fx.Node) -> None:
        """Bind the layer's tops to ``nodes``, one node per top."""
        if len(nodes) != len(layer.tops):
            raise self.error(layer, f"has {len(layer.tops)} top blob(s), expected {len(nodes)}")
        for blob, node in zip(layer.tops, nodes):
            self.blobs[blob] = self.unread[blob] = node

    def read_later(self, blob: str) -> bool:
        """Whether a layer after the current one reads ``blob`` before something overwrites it."""
        for layer in self.layers[self.index + 1:]:
            if blob in layer.bottoms:
                return True
            if blob in layer.tops:
                return False
        return False

    # -- weights ----------------------------------------------------------------------------------
    def blobs_for(self, layer: Layer, shapes: list[tuple[int, ...]]) -> list[torch.Tensor] | None:
        """The layer's stored blobs as float32 tensors of ``shapes``, or ``None`` without weights.

        Raises if the caffemodel holds a different number of blobs or other shapes (a legacy
        4-D ``num/channels/height/width`` blob matches a shape padded with leading ones, as in Caffe).
        """
        stored = (self.weights or {}).get(layer.name)
        if stored is None:
            self.unweighted.append(layer.name)
            return None
        self.used_weights.add(layer.name)
        where = f"weights {self.weights_path}: layer {layer.name!r} ({layer.type})"
        if len(stored) != len(shapes):
            raise ModelLoadError(f"{where} has {len(stored)} blob(s), the prototxt implies {len(shapes)} "
                                 f"({', '.join(str(list(s)) for s in shapes)})")
        out = []
        for i, (blob, shape) in enumerate(zip(stored, shapes)):
            want = tuple(shape)
            fits = blob.shape == want or (blob.legacy and len(want) <= 4 and blob.shape == (1,) * (4 - len(want)) + want)
            if not fits:
                raise ModelLoadError(f"{where}: blob {i} has shape {list(blob.shape)}, the prototxt implies {list(want)}")
            out.append(torch.from_numpy(blob.data.reshape(want).copy()))
        return out

    def check_unused(self, layer: Layer) -> None:
        """A layer without parameters must not be given blobs by the caffemodel."""
        stored = (self.weights or {}).get(layer.name)
        if stored and layer.name not in self.used_weights:
            raise ModelLoadError(f"weights {self.weights_path}: layer {layer.name!r} ({layer.type}) has "
                                 f"{len(stored)} blob(s), the prototxt implies 0")

    # -- result -----------------------------------------------------------------------------------
    def finish(self, class_name: str) -> torch.fx.GraphModule:
        outputs = list(self.unread.values())
        if not outputs:
            raise ModelLoadError(f"{self.path}: the net has no output (every blob is read by a later layer)")
        self.graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
        self.graph.lint()
        gm = torch.fx.GraphModule(self.modules, self.graph, class_name)
        return gm.eval()


def count(shape) -> int:
    return math.prod(int(s) for s in shape)
