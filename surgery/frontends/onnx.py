"""ONNX in: fold shape-only subgraphs, convert with ``onnx2torch``, make float weights trainable.

    onnx file -> opset check -> fold constants for one input shape -> onnx2torch -> tidy -> GraphModule

1. **Opset**: every node needs an ``onnx2torch`` converter at the model's opset; a model outside
   that (too new, or an op it lacks) is one :class:`~surgery.errors.ModelLoadError` naming the ops.
2. **Folding** (:func:`fold_constants`): with the input shape fixed, every ``Shape``/``Size`` of a
   tensor whose shape is static becomes a constant, and every node whose inputs are all constants
   (the ``Gather``/``Concat``/``Unsqueeze``/``Cast`` chains a Keras ``Flatten`` or a dynamic-batch
   ``Reshape`` leaves behind, ``Identity`` aliases of weights, ``Constant`` nodes) is evaluated with
   onnx's reference evaluator and becomes an initializer. Dead nodes are dropped.
3. **Conversion** with ``onnx2torch``, then :func:`~surgery.frontends._onnx_torch.tidy`: float
   weight buffers become parameters, size-carrying modules become torch calls with literal sizes,
   ``MatMul`` + ``Add`` with constant weights becomes ``nn.Linear``, and the simple ``onnx2torch``
   modules become the torch functions they wrap (so the model saves as a dense checkpoint).

Examples
--------
>>> import onnx, onnx.helper as oh, numpy as np, torch
>>> w = onnx.numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
>>> g = oh.make_graph([oh.make_node("Conv", ["x", "w"], ["y"])], "g",
...     [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 5, 5])],
...     [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [w])
>>> gm, shape = convert(oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)]))
>>> shape, tuple(gm(torch.ones(shape)).shape)
((1, 3, 5, 5), (1, 4, 5, 5))
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelLoadError
from ._onnx_torch import tidy

__all__ = ["load_onnx", "convert", "fold_constants", "MIN_OPSET"]

MIN_OPSET = 9  # onnx2torch's documented floor
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
            "If", "Loop", "Scan"}


def _one_line(exc: BaseException) -> str:
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return _printable(f"{type(exc).__name__}: {first}" if first else type(exc).__name__)


def _printable(text: str) -> str:
    """``text`` with control characters escaped (names in a corrupt file may hold newlines)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# -- opset ------------------------------------------------------------------------------------------
def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def check_opset(model, source: str = "the ONNX model") -> int:
    """The model's default-domain opset; raises when ``onnx2torch`` cannot convert one of its ops there."""
    from onnx2torch.node_converters.registry import get_converter

    opset = _opset(model)
    if opset < MIN_OPSET:
        raise ModelLoadError(f"{source}: opset {opset} is older than onnx2torch supports (>= {MIN_OPSET}); "
                             f"upgrade it with onnx.version_converter")
    missing = []
    versions = {o.domain: o.version for o in model.opset_import}
    for node in model.graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        try:
            get_converter(node.op_type, versions.get(domain, opset), domain)
        except NotImplementedError:
            missing.append(f"{domain + '.' if domain else ''}{node.op_type}")
    if missing:
        names = _printable(", ".join(sorted(set(missing))))
        raise ModelLoadError(f"{source}: onnx2torch has no converter at opset {opset} for {names}; "
                             f"re-export with another opset (onnx2torch covers opsets {MIN_OPSET}-{_max_opset()})")
    return opset


def _max_opset() -> int:
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY

    return max(d.version for d in _CONVERTER_REGISTRY if d.domain == "")


# -- input shape ------------------------------------------------------------------------------------
def _graph_inputs(model) -> list:
    inits = {i.name for i in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def input_shape(model, shape: tuple[int, ...] | None = None, source: str = "the ONNX model") -> tuple[int, ...]:
    """The one input's shape: ``shape`` when given (checked against the static dims), else the
    model's own dims with a symbolic batch read as 1; raises when a non-batch dim is symbolic."""
    inputs = _graph_inputs(model)
    if len(inputs) != 1:
        raise ModelLoadError(f"{source} has {len(inputs)} inputs; surgery loads ONNX models with exactly one input")
    value = inputs[0]
    if not value.type.HasField("tensor_type"):
        raise ModelLoadError(f"{source}: input {value.name!r} is not a tensor")
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in value.type.tensor_type.shape.dim]
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        bad = [i for i, d in enumerate(dims) if d is not None and i > 0 and d != shape[i]] if len(shape) == len(dims) else [-1]
        if bad:
            raise ModelLoadError(f"{source}: input shape {shape} does not fit the model's input "
                                 f"{tuple(d if d is not None else '?' for d in dims)}")
        return shape
    if None in dims[1:]:
        raise ModelLoadError(f"{source}: input {value.name!r} has symbolic dims "
                             f"{tuple(d if d is not None else '?' for d in dims)}; pass --input-shape (input_shape=)")
    return tuple([dims[0] or 1] + dims[1:]) if dims else ()


def _set_input_shape(model, shape: tuple[int, ...]) -> None:
    value = _graph_inputs(model)[0]
    tensor_shape = value.type.tensor_type.shape
    del tensor_shape.dim[:]
    for s in shape:
        tensor_shape.dim.add().dim_value = int(s)


# -- constant folding -------------------------------------------------------------------------------
def _static_shapes(model) -> dict[str, tuple[int, ...]]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=False)
    out = {}
    for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        if not v.type.HasField("tensor_type") or not v.type.tensor_type.HasField("shape"):
            continue
        dims = v.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            out[v.name] = tuple(int(d.dim_value) for d in dims)
    return out


def _shape_value(node, shape: tuple[int, ...]) -> np.ndarray:
    attrs = {a.name: a.i for a in node.attribute}
    rank = len(shape)
    start, end = attrs.get("start", 0), attrs.get("end", rank)
    start, end = (max(0, min(rank, s + rank if s < 0 else s)) for s in (start, end))
    return np.array(shape[start:end], dtype=np.int64)


def _evaluate(node, values: dict[str, np.ndarray], opsets: dict[str, int]) -> list[np.ndarray] | None:
    from onnx.reference import ReferenceEvaluator

    try:
        ev = ReferenceEvaluator(node, opsets=opsets)
        feeds = {name: values[name] for name in node.input if name}
        return [np.asarray(v) for v in ev.run(None, feeds)]
    except Exception:  # an op the reference evaluator lacks: leave the node to onnx2torch
        return None


def _fold_round(model) -> bool:
    from onnx import numpy_helper

    graph = model.graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    shapes = _static_shapes(model)
    opsets = {o.domain: o.version for o in model.opset_import}
    kept, changed = [], False
    for node in graph.node:
        outs = None
        if node.domain in ("", "ai.onnx") and node.op_type == "Shape" and node.input[0] in shapes:
            outs = [_shape_value(node, shapes[node.input[0]])]
        elif node.domain in ("", "ai.onnx") and node.op_type == "Size" and node.input[0] in shapes:
            outs = [np.array(int(np.prod(shapes[node.input[0]])), dtype=np.int64)]
        elif (node.domain in ("", "ai.onnx") and node.op_type not in _NO_FOLD
              and all(not name or name in values for name in node.input)):
            outs = _evaluate(node, values, opsets)
        if outs is None or len(outs) != len(node.output):
            kept.append(node)
            continue
        for name, value in zip(node.output, outs):
            if name:
                values[name] = value
                graph.initializer.append(numpy_helper.from_array(value, name))
        changed = True
    if changed:
        del graph.node[:]
        graph.node.extend(kept)
    return changed


def _drop_dead(model) -> None:
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    dropped = {i.name for i in graph.initializer if i.name not in needed}
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    inputs = [v for v in graph.input if v.name not in dropped]  # old files list weights as inputs too
    del graph.input[:]
    graph.input.extend(inputs)


def fold_constants(model, shape: tuple[int, ...], max_rounds: int = 8):
    """A copy of ``model`` with its input fixed to ``shape`` and every constant subgraph folded.

    A round folds ``Shape``/``Size`` of statically shaped tensors and every node whose inputs are
    all constants; rounds repeat (shape inference sees the new constants) until nothing changes.
    """
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    _set_input_shape(out, shape)
    del out.graph.value_info[:]
    for _ in range(max_rounds):
        if not _fold_round(out):
            break
    _drop_dead(out)
    return out


def convert(model, shape: tuple[int, ...] | None = None, source: str = "the ONNX model"):
    """``(GraphModule, input_shape)`` for an ``onnx.ModelProto`` (see the module docstring)."""
    import onnx2torch

    try:
        check_opset(model, source)
        shape = input_shape(model, shape, source)
        folded = fold_constants(model, shape)
    except ModelLoadError:
        raise
    except Exception as exc:  # a corrupt file: onnx's shape inference, numpy or the schema lookup complain
        raise ModelLoadError(f"{source}: not a valid ONNX model ({_one_line(exc)})") from None
    try:
        gm = onnx2torch.convert(folded)
    except Exception as exc:
        raise ModelLoadError(f"{source}: onnx2torch cannot convert it ({_one_line(exc)})") from None
    try:
        tidy(gm, shape)
    except Exception as exc:
        raise ModelLoadError(f"{source}: the converted model does not run at input {shape} ({_one_line(exc)})") from None
    return gm.eval(), shape


def load_onnx(path: str, shape: tuple[int, ...] | None = None):
    """Load the ONNX file at ``path``: ``(GraphModule, input_shape)``; one-line errors."""
    import onnx

    try:
        model = onnx.load(path)
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable ONNX model ({_one_line(exc)})") from None
    if not model.graph.node:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph nodes)")
    return convert(model, shape, path)
