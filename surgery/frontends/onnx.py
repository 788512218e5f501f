"""ONNX in: fold shape-only subgraphs, convert with ``onnx2torch``, make float weights trainable.

    onnx file -> opset check -> fold constants for one input shape -> onnx2torch -> tidy -> GraphModule

1. **Opset**: every node needs an ``onnx2torch`` converter at the model's opset; a model outside
   that (too new, or an op it lacks) is one :class:`~surgery.errors.ModelLoadError` naming the ops.
2. **Folding** (:func:`fold_constants`): with the input shape fixed, every ``Shape``/``Size`` of a
   tensor whose shape is static becomes a constant, and every node whose inputs are all constants
   (the ``Gather``/``Concat``/``Unsqueeze``/``Cast`` chains a Keras ``Flatten`` or a dynamic-batch
   ``Reshape`` leaves behind, ``Identity`` aliases of weights, ``Constant`` nodes) is evaluated with
   onnx's reference evaluator and becomes an initializer. Dead nodes are dropped.
3. **Conversion** with ``onnx2torch``; module names lose the ``/`` of ONNX node names.
4. **Tidy**: float buffers become ``nn.Parameter`` (``onnx2torch`` keeps Gemm/MatMul weights and
   folded constants as buffers, which would neither train nor be pruned), except BatchNorm running
   statistics; ``Reshape``/``Pad``/``Squeeze``/``Unsqueeze`` modules whose sizes are constant
   tensors become torch calls with literal sizes, so the dependency graph follows the channels
   through them and ``torch.export`` meets no data-dependent size; ``MatMul`` with a constant
   weight (and a following constant ``Add``) becomes ``nn.Linear`` (a TF ``Dense``).

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

import re

import numpy as np
import torch
import torch.fx
from torch import nn

from ..errors import ModelLoadError

__all__ = ["load_onnx", "convert", "fold_constants", "MIN_OPSET"]

MIN_OPSET = 9  # onnx2torch's documented floor
_STATISTICS = ("running_mean", "running_var")
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
            "If", "Loop", "Scan"}


def _one_line(exc: BaseException) -> str:
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


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
        names = ", ".join(sorted(set(missing)))
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


# -- torch side -------------------------------------------------------------------------------------
def _clean_names(gm: torch.fx.GraphModule) -> None:
    """ONNX node names (``layer1/conv/Conv``) as module names ``layer1_conv_Conv``."""
    renamed, used = {}, set()
    for name in list(gm._modules):
        new = re.sub(r"\W+", "_", name).strip("_") or "node"
        if new[0].isdigit():
            new = f"n{new}"
        base, k = new, 1
        while new in used:
            k += 1
            new = f"{base}_{k}"
        used.add(new)
        renamed[name] = new
    gm._modules = type(gm._modules)((renamed[k], v) for k, v in gm._modules.items())
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            head, dot, rest = node.target.partition(".")
            if head in renamed:
                node.target = renamed[head] + dot + rest


def _buffers_to_parameters(gm: nn.Module) -> int:
    """Float buffers become parameters (BatchNorm running statistics stay buffers); returns how many."""
    n = 0
    for module in gm.modules():
        norm = isinstance(module, nn.modules.batchnorm._NormBase)
        for name, buf in list(module._buffers.items()):
            if buf is None or not buf.is_floating_point() or (norm and name in _STATISTICS):
                continue
            del module._buffers[name]
            module.register_parameter(name, nn.Parameter(buf.detach().clone()))
            n += 1
    return n


def _attr(gm: nn.Module, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _constant(gm: nn.Module, arg) -> list | None:
    """The value of a ``get_attr`` argument as a (nested) list, else None."""
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        return _attr(gm, arg.target).detach().tolist()
    return None


def _reshape(module, x, args, shape):
    dims = [int(d) for d in args[0]]
    if 0 in dims:  # ONNX: 0 copies the input's dim
        dims = [shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return [(torch.reshape, (tuple(dims),))]


def _squeeze(module, x, args, shape):
    axes = sorted({int(a) % len(shape) for a in args[0]}) if args and args[0] else None
    return [(torch.squeeze, (tuple(axes),) if axes else ())]


def _unsqueeze(module, x, args, shape):
    rank = len(shape) + len(args[0])
    return [(torch.unsqueeze, (int(a) % rank,)) for a in sorted(int(a) % rank for a in args[0])]


def _pad(module, x, args, shape):
    pads = [int(p) for p in args[0]]
    half = len(pads) // 2
    torch_pads = [p for begin, end in zip(pads[:half][::-1], pads[half:][::-1]) for p in (begin, end)]
    if module.mode != "constant":
        while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:
            torch_pads = torch_pads[:-2]
    value = float(args[1]) if len(args) > 1 and args[1] is not None else 0.0
    call = (torch.nn.functional.pad, (tuple(torch_pads), module.mode, value))
    return [call]


def _literal_calls() -> dict:
    from onnx2torch.node_converters.pad import OnnxPadDynamic
    from onnx2torch.node_converters.reshape import OnnxReshape
    from onnx2torch.node_converters.squeeze import OnnxSqueezeDynamicAxes
    from onnx2torch.node_converters.unsqueeze import OnnxUnsqueezeDynamicAxes

    return {OnnxReshape: _reshape, OnnxSqueezeDynamicAxes: _squeeze, OnnxUnsqueezeDynamicAxes: _unsqueeze,
            OnnxPadDynamic: _pad}


def _literal_args(gm: torch.fx.GraphModule, shapes: dict[str, tuple[int, ...]]) -> None:
    """onnx2torch modules that read sizes from constant tensors (``Reshape``'s shape, ``Pad``'s pads,
    ``Squeeze``/``Unsqueeze`` axes) become plain torch calls with literal arguments, so the
    dependency graph follows channels through them and ``torch.export`` sees no data-dependent size."""
    table = _literal_calls()
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        build = table.get(type(module))
        x, rest = node.args[0], node.args[1:]
        consts = [_constant(gm, a) for a in rest]
        if build is None or x.name not in shapes or any(c is None for c, a in zip(consts, rest) if a is not None):
            continue
        value = x
        with gm.graph.inserting_before(node):
            for fn, args in build(module, x, consts, shapes[x.name]):
                value = gm.graph.call_function(fn, (value, *args))
        node.replace_all_uses_with(value)
        gm.graph.erase_node(node)
    _drop_unread(gm)


def _drop_unread(gm: torch.fx.GraphModule) -> None:
    """Dead code out of the graph, and the constants no ``get_attr`` reads any more out of the module."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    owners = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name, _ in [*gm.named_buffers(), *gm.named_parameters()]:
        owner, _, attr = name.rpartition(".")
        if name not in read and not any(owner == o or owner.startswith(o + ".") for o in owners):
            delattr(gm.get_submodule(owner) if owner else gm, attr)


def _sole_constant(gm: nn.Module, node, dim: int) -> torch.Tensor | None:
    """The float parameter ``node`` reads, if it is a ``get_attr`` of ``dim`` dims read only once."""
    if not (isinstance(node, torch.fx.Node) and node.op == "get_attr" and len(node.users) == 1):
        return None
    value = _attr(gm, node.target)
    return value if isinstance(value, nn.Parameter) and value.dim() == dim else None


def _bias_add(gm: nn.Module, node, width: int):
    """``(add node, bias)`` when the only user of ``node`` adds a constant vector of ``width``."""
    from onnx2torch.node_converters.binary_math_operations import OnnxBinaryMathOperation

    if len(node.users) != 1:
        return None
    add = next(iter(node.users))
    module = gm.get_submodule(add.target) if add.op == "call_module" else None
    if not (isinstance(module, OnnxBinaryMathOperation) and module.math_op_function is torch.add and module.broadcast is None):
        return None
    other = add.args[1] if add.args[0] is node else add.args[0]
    bias = _sole_constant(gm, other, 1)
    return (add, bias) if bias is not None and bias.shape[0] == width else None


def _dense_as_linear(gm: torch.fx.GraphModule) -> None:
    """``MatMul(x, W)`` (+ ``Add(b)``) with constant ``W`` -> ``nn.Linear``: a TF Dense layer is then a
    layer that weight-based methods score like any other."""
    from onnx2torch.node_converters.matmul import OnnxMatMul

    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), OnnxMatMul):
            continue
        weight = _sole_constant(gm, node.args[1], 2)
        if weight is None:
            continue
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=False)
        linear.weight = nn.Parameter(weight.detach().t().contiguous())
        found = _bias_add(gm, node, weight.shape[1])
        if found is not None:
            add, bias = found
            linear.bias = nn.Parameter(bias.detach().clone())
            add.replace_all_uses_with(node)
            gm.graph.erase_node(add)
        gm._modules[node.target] = linear
        node.args = (node.args[0],)
    _drop_unread(gm)


def _node_shapes(gm: torch.fx.GraphModule, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(torch.zeros(shape))
    return {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
            if hasattr(n.meta.get("tensor_meta"), "shape")}


def convert(model, shape: tuple[int, ...] | None = None, source: str = "the ONNX model"):
    """``(GraphModule, input_shape)`` for an ``onnx.ModelProto`` (see the module docstring)."""
    import onnx2torch

    check_opset(model, source)
    shape = input_shape(model, shape, source)
    folded = fold_constants(model, shape)
    try:
        gm = onnx2torch.convert(folded)
    except Exception as exc:
        raise ModelLoadError(f"{source}: onnx2torch cannot convert it ({_one_line(exc)})") from None
    _clean_names(gm)
    _buffers_to_parameters(gm)
    gm.recompile()
    try:
        shapes = _node_shapes(gm, shape)
    except Exception as exc:
        raise ModelLoadError(f"{source}: the converted model does not run at input {shape} ({_one_line(exc)})") from None
    _literal_args(gm, shapes)
    _dense_as_linear(gm)
    gm.graph.lint()
    gm.recompile()
    gm.eval()
    return gm, shape


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
