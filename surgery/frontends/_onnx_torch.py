"""The torch side of ONNX import: tidy what ``onnx2torch`` made into plain torch.

:func:`tidy` runs, in order, on the ``GraphModule`` ``onnx2torch`` returns:

* module names lose the ``/`` and ``:`` of ONNX node names (``layer1/conv/Conv`` -> ``layer1_conv_Conv``);
* float buffers become ``nn.Parameter`` (``onnx2torch`` keeps Gemm/MatMul weights and folded
  constants as buffers, which would neither train nor be pruned); BatchNorm statistics stay buffers;
* ``Reshape``/``Pad``/``Squeeze``/``Unsqueeze`` modules whose sizes come from constant tensors become
  torch calls with literal sizes (the dependency graph follows channels through them, and
  ``torch.export`` meets no data-dependent size);
* ``MatMul`` with a constant weight (and a following constant ``Add``) becomes ``nn.Linear``;
* the other simple ``onnx2torch`` modules (Transpose, Add/Sub/Mul/Div, GlobalAveragePool, MatMul,
  Clip, Concat, static Squeeze/Unsqueeze/Pad, ReduceMean/ReduceSum) become the torch functions they
  wrap, so the result holds only ``torch.nn`` modules where it can and saves as a dense checkpoint.

A module none of these covers stays as ``onnx2torch`` made it: it runs, and the dependency graph
stops the channels it touches (unprunable, never wrong).
"""

from __future__ import annotations

import re

import torch
import torch.fx
from torch import nn

__all__ = ["tidy"]

_STATISTICS = ("running_mean", "running_var")


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
        _same_meta(shapes, node, value)
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
    """``{node name: static shape}`` from one run at ``shape`` (float dtypes only are recorded in
    ``_FLOAT``)."""
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(torch.zeros(shape))
    out = {}
    for n in gm.graph.nodes:
        meta = n.meta.get("tensor_meta")
        if hasattr(meta, "shape"):
            out[n.name] = tuple(meta.shape)
            if meta.dtype.is_floating_point:
                out.setdefault(_FLOAT, set()).add(n.name)
    return out


_FLOAT = "__float__"


def _same_meta(meta: dict, old: torch.fx.Node, new: torch.fx.Node) -> None:
    """``new`` replaces ``old``: it has its shape (and float-ness) for the passes after."""
    if old.name in meta:
        meta[new.name] = meta[old.name]
        if old.name in meta.get(_FLOAT, ()):
            meta[_FLOAT].add(new.name)




# -- onnx2torch modules -> torch functions ----------------------------------------------------------
def _call(graph, fn, *args, **kwargs):
    return graph.call_function(fn, args, kwargs)


def _transpose(graph, module, node, meta):
    x = node.args[0]
    perm = module.perm if module.perm is not None else list(range(len(meta[x.name])))[::-1]
    return _call(graph, torch.permute, x, tuple(int(p) for p in perm))


def _binary(graph, module, node, meta):
    fn = module.math_op_function
    if module.broadcast == 1 and module.axis is not None:
        return None  # old-style axis broadcast: leave it to the module
    if fn in (torch.add, torch.sub, torch.mul):
        return _call(graph, fn, *node.args[:2])
    if getattr(fn, "__name__", "") == "_onnx_div" and node.name in meta.get(_FLOAT, ()):
        return _call(graph, torch.div, *node.args[:2])
    return None


def _global_pool(graph, module, node, meta):
    x = node.args[0]
    return _call(graph, torch.mean, x, tuple(range(2, len(meta[x.name]))), keepdim=True)


def _matmul(graph, module, node, meta):
    return _call(graph, torch.matmul, *node.args[:2])


def _clip(graph, module, node, meta):
    return _call(graph, torch.clamp, node.args[0], module.min_val, module.max_val)


def _concat(graph, module, node, meta):
    return _call(graph, torch.cat, list(node.args), dim=int(module.axis))


def _squeeze_static(graph, module, node, meta):
    x = node.args[0]
    if not module.axes:
        return _call(graph, torch.squeeze, x)
    return _call(graph, torch.squeeze, x, tuple(sorted(int(a) % len(meta[x.name]) for a in module.axes)))


def _unsqueeze_static(graph, module, node, meta):
    value = node.args[0]
    rank = len(meta[value.name]) + len(module._axes)
    for axis in sorted(int(a) % rank for a in module._axes):
        value = _call(graph, torch.unsqueeze, value, axis)
    return value


def _pad_static(graph, module, node, meta):
    return _call(graph, torch.nn.functional.pad, node.args[0], tuple(int(p) for p in module.pads), module.mode,
                 float(module.constant_value or 0.0))


def _reduce_static(graph, module, node, meta):
    if module.operation_type not in ("ReduceMean", "ReduceSum") or not module.axes:
        return None
    x = node.args[0]
    axes = tuple(sorted(int(a) % len(meta[x.name]) for a in module.axes))
    return _call(graph, module.math_op_function, x, axes, keepdim=bool(module.keepdims))


def _module_table() -> dict:
    from onnx2torch.node_converters import binary_math_operations as binary
    from onnx2torch.node_converters import clip, concat, global_average_pool, matmul, pad, reduce, squeeze, transpose
    from onnx2torch.node_converters import unsqueeze

    return {
        transpose.OnnxTranspose: _transpose, binary.OnnxBinaryMathOperation: _binary,
        global_average_pool.OnnxGlobalAveragePool: _global_pool,
        global_average_pool.OnnxGlobalAveragePoolWithKnownInputShape: _global_pool,
        matmul.OnnxMatMul: _matmul, clip.OnnxClip: _clip, concat.OnnxConcat: _concat,
        squeeze.OnnxSqueezeStaticAxes: _squeeze_static, unsqueeze.OnnxUnsqueezeStaticAxes: _unsqueeze_static,
        pad.OnnxPadStatic: _pad_static, reduce.OnnxReduceStaticAxes: _reduce_static,
    }


def _module_calls(gm: torch.fx.GraphModule, meta: dict) -> None:
    """Each ``onnx2torch`` module the table knows becomes the torch call it wraps."""
    table = _module_table()
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        build = table.get(type(module))
        if build is None or any(isinstance(a, torch.fx.Node) and a.name not in meta for a in node.args):
            continue
        with gm.graph.inserting_before(node):
            new = build(gm.graph, module, node, meta)
        if new is None:
            continue
        _same_meta(meta, node, new)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    _drop_unread(gm)


def tidy(gm: torch.fx.GraphModule, shape: tuple[int, ...]) -> torch.fx.GraphModule:
    """Tidy ``gm`` (what ``onnx2torch`` returned) in place for the input ``shape``; see the module docstring."""
    _clean_names(gm)
    _buffers_to_parameters(gm)
    gm.recompile()
    meta = _node_shapes(gm, shape)
    _literal_args(gm, meta)
    _dense_as_linear(gm)
    _module_calls(gm, meta)
    gm.graph.lint()
    gm.recompile()
    return gm
