"""The ``torch.export`` front end: a plain, shape-generic, trainable and storable ``GraphModule``.

``export_module(model, inputs)`` returns what ``ExportedProgram.module()`` computes, rebuilt so that
the next step a user takes works on it:

* **Dynamic shapes.** The model is exported with a shared ``Dim("batch")`` on dim 0 of every batched
  input and ``Dim.AUTO`` on every other dim of size 2 or more (export fixes the dims the weights fix,
  such as channels). A try is kept only if the graph can check every guard export recorded
  (``export_checks.py``): bounds on sizes become checks (``if x.shape[-1] > 4`` leaves a graph for
  widths of 5 and more), an equation over several sizes (``H * W == 64``, a flatten into a linear
  layer) rejects the try. Then batch alone is made dynamic, then nothing, with a warning naming the
  guard. Symbolic sizes can cost far more than the trace itself (NASNet's computed "same" padding:
  ~3.5x per cell), so the try with dynamic sizes is given ``DYNAMIC_SECONDS`` (checked at every
  module call) before it gives way to the batch-only try; the warning says so. A model class and
  input shapes that ran out of time once skip that try for the rest of the process (tracing the
  pruned copy again would take as long). A batch of 1 is traced as a batch of 2 (export fixes dims
  of size 0 or 1, and assumes a dynamic dim is never 1: ``if x.shape[0] == 1`` takes the other branch
  without a guard), so that graph is run once on the example and kept only if it computes what the
  model computes. Like ``ExportedProgram.module()``, the graph accepts 0 and 1 for a dynamic dim.
* **Input checks as graph nodes** (``torch._assert`` over ``aten.sym_size.int``), instead of
  export's ``_guards_fn`` module / forward pre-hook, which neither pickle nor store as data.
* **Train / eval.** ``aten.batch_norm(..., training=False, ...)`` of a ``BatchNorm`` module becomes a
  call of a ``torch.nn.BatchNormNd`` holding the same tensors, and ``aten.dropout(..., train=False)``
  of a dropout module a call of that dropout class, so ``train()`` / ``eval()`` switch them again.
* **Plain inputs and outputs.** Inputs that are a tuple of tensors and outputs made of tuples, lists
  and dicts use fx's plain code generator; other structures keep export's pytree code generator
  (the dense checkpoint stores its specs as JSON).
"""

from __future__ import annotations

import contextlib
import inspect
import time
import warnings
from collections.abc import Sequence

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim

from .export_checks import input_checks, insert_checks

__all__ = ["export_module", "DYNAMIC_SECONDS"]

#: Wall-clock seconds the export with dynamic sizes (beyond the batch) may take before the batch-only
#: try is used instead (a correct graph, dynamic in the batch only, with a warning).
DYNAMIC_SECONDS = 30.0
#: (model class, input shapes) whose try with dynamic sizes ran out of time in this process
_OUT_OF_TIME: set[tuple] = set()

aten = torch.ops.aten

_KEEP_META = ("stack_trace", "nn_module_stack")
_BN_TENSORS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
_BN_CLASS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
#: aten dropout op (and its in-place form) -> the dropout module classes whose eval-mode call it is,
#: with the input ranks they take
_DROPOUT = {}
for _name, _classes, _ranks in (
    ("dropout", (nn.Dropout,), None),
    ("alpha_dropout", (nn.AlphaDropout,), None),
    ("feature_alpha_dropout", (nn.FeatureAlphaDropout,), None),
    ("feature_dropout", (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d), {nn.Dropout1d: 3, nn.Dropout2d: 4, nn.Dropout3d: 5}),
):
    for _op in (getattr(aten, _name, None), getattr(aten, _name + "_", None)):
        if _op is not None:
            _DROPOUT[_op.default] = (_classes, _ranks)


# -- dynamic shapes -----------------------------------------------------------------------------
def _tries(inputs: tuple) -> list[tuple[str, tuple, object, bool]]:
    """``(label, example inputs, dynamic_shapes, batch doubled)`` to export with, most dynamic first.

    Dim 0 of a tensor is the batch when it equals the first tensor's dim 0 (for a batch of 1: in
    tensors of the first tensor's rank only, since any dim of size 1 would match).
    """
    leaves = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not leaves or leaves[0].shape[0] == 0:
        return [("static", inputs, None, False)]
    batch, rank = int(leaves[0].shape[0]), leaves[0].dim()
    name = Dim("batch")

    def batched(t) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch and (batch > 1 or t.dim() == rank)

    def spec(others: bool):
        def one(t):
            if not isinstance(t, torch.Tensor):
                return None
            b = batched(t)
            dims = {d: Dim.AUTO for d in range(1 if b else 0, t.dim()) if others and t.shape[d] >= 2}
            return {0: name, **dims} if b else (dims or None)

        return pytree.tree_map(one, inputs)

    # export fixes dims of size 0/1: trace a batch of 1 as a batch of 2
    example = pytree.tree_map(lambda t: torch.cat([t, t]) if batch == 1 and batched(t) else t, inputs)
    full, only_batch = spec(True), spec(False)
    doubled = batch == 1
    out = [(_DYNAMIC_SIZES, example, full, doubled)] if full != only_batch else []
    return out + [("batch", example, only_batch, doubled), ("static", inputs, None, False)]


_DYNAMIC_SIZES = "batch and other dims"


class _OutOfTime(Exception):
    pass


def _out_of_time(exc: BaseException | None) -> str:
    """The time box's message when ``exc`` is, or was raised from, its exception (export may wrap it)."""
    while exc is not None:
        if isinstance(exc, _OutOfTime):
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    return ""


def _gave_up(seconds: float) -> str:
    return f"gave up after {seconds:.0f} s of tracing with symbolic sizes"


@contextlib.contextmanager
def _time_box(seconds: float | None):
    """Raise ``_OutOfTime`` at the first module call after ``seconds`` (None: no limit)."""
    if seconds is None:
        yield
        return
    deadline = time.monotonic() + seconds

    def check(module, args):
        if time.monotonic() > deadline:
            raise _OutOfTime(_gave_up(seconds))

    handle = nn.modules.module.register_module_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


def _arg_names(model: nn.Module, n: int) -> list[str]:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names[:n] if len(names) >= n else []


def _input_names(model: nn.Module, inputs: tuple) -> dict[str, int]:
    """``"x"``, ``"extra[0]"``, ``"opts['scale']"`` -> index among the flat inputs (how guards name them)."""
    names: dict[str, int] = {}
    for name, arg in zip(_arg_names(model, len(inputs)), inputs):
        for path, _ in pytree.tree_flatten_with_path(arg)[0]:
            names[name + pytree.keystr(path)] = len(names)
    return names if len(names) == len(pytree.tree_leaves(inputs)) else {}  # forward(*args): unreadable


def _why_not(exc: Exception) -> str:
    """The line of an export error that says what the model does ("- You marked batch as dynamic
    but your code specialized it to be a constant (2)"), else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = next((line[2:] for line in lines if line.startswith("- ")), lines[0] if lines else type(exc).__name__)
    return detail.split(". ")[0]


def _differs(gm: torch.fx.GraphModule, model: nn.Module, inputs: tuple, tol: float = 1e-4) -> str:
    """Why ``gm`` does not compute what ``model`` computes on ``inputs`` ("" if it does)."""
    try:
        with torch.no_grad():
            want, got = pytree.tree_leaves(model(*inputs)), pytree.tree_leaves(gm(*inputs))
    except Exception as exc:
        return f"the graph fails on the example ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})"
    if len(want) != len(got):
        return "the graph returns a different number of values on the example"
    for a, b in zip(got, want):
        if isinstance(b, torch.Tensor) and isinstance(a, torch.Tensor) and a.shape == b.shape:
            if not b.is_floating_point() and torch.equal(a, b):
                continue
            if b.is_floating_point() and float((a.double() - b.double()).norm()) <= tol * max(float(b.double().norm()), 1e-12):
                continue
        elif not isinstance(b, torch.Tensor) and a == b:
            continue
        return "the graph traced at batch 2 computes something else at the example's batch of 1"
    return ""


# -- the plain GraphModule ------------------------------------------------------------------------
def _plain_spec(spec) -> bool:
    """Whether ``spec`` is a leaf or made of tuples, lists and str-keyed dicts."""
    if spec.is_leaf():
        return True
    if spec.type not in (tuple, list, dict):
        return False
    if spec.type is dict and not all(isinstance(k, str) for k in spec.context):
        return False
    return all(_plain_spec(c) for c in spec.children())


def _flat_inputs(in_spec) -> bool:
    """``((leaf, leaf, ...), {})``: positional leaves only."""
    if in_spec.type is not tuple or in_spec.num_children != 2:
        return False
    args, kwargs = in_spec.children()
    return args.type is tuple and all(c.is_leaf() for c in args.children()) and kwargs.type is dict and kwargs.num_children == 0


def _innermost(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else None


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _place(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` in ``root``, creating plain containers on the way."""
    parent, _, name = path.rpartition(".")
    holder = root
    for part in parent.split(".") if parent else ():
        if part not in holder._modules:
            holder.add_module(part, nn.Module())
        holder = holder._modules[part]
    holder._modules[name] = module


def _batch_norm_module(node: torch.fx.Node, model: nn.Module, root: nn.Module):
    """``(path, BatchNormNd)`` for an eval-mode ``aten.batch_norm`` of a BatchNorm module, else None."""
    x, w, b, mean, var, training, momentum, eps = (list(node.args) + [None] * 9)[:8]
    if training is not False or not all(isinstance(t, torch.fx.Node) and t.op == "get_attr" for t in (mean, var)):
        return None
    path = mean.target.rpartition(".")[0]
    want = {"weight": w, "bias": b, "running_mean": mean, "running_var": var}
    if not path or _innermost(node) != path or any(
        t is not None and not (isinstance(t, torch.fx.Node) and t.op == "get_attr" and t.target == f"{path}.{k}")
        for k, t in want.items()
    ):
        return None
    user, holder = _submodule(model, path), _submodule(root, path)
    if not isinstance(user, nn.modules.batchnorm._BatchNorm) or not user.track_running_stats or user.eps != eps:
        return None
    if isinstance(holder, nn.modules.batchnorm._BatchNorm):
        return path, holder  # a second call of the same module
    if holder is None or holder._modules or not set(holder._parameters) | set(holder._buffers) <= _BN_TENSORS:
        return None
    ndim = x.meta["val"].dim() if isinstance(x.meta.get("val"), torch.Tensor) else 0
    if ndim not in _BN_CLASS:
        return None
    bn = _BN_CLASS[ndim](user.num_features, eps=eps, momentum=user.momentum, affine=w is not None, device="meta")
    for k in ("weight", "bias"):
        bn._parameters[k] = holder._parameters.get(k) if want[k] is not None else None
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        t = getattr(holder, k, None)
        bn._buffers[k] = t if t is not None else torch.tensor(0, dtype=torch.long)
    bn.num_features = bn.running_mean.shape[0]
    return path, bn.train(False)


def _dropout_module(node: torch.fx.Node, model: nn.Module, root: nn.Module):
    """``(path, dropout module)`` for an eval-mode dropout op of a dropout module, else None."""
    classes, ranks = _DROPOUT[node.target]
    x, p, train = (list(node.args) + [None] * 3)[:3]
    path = _innermost(node)
    user = _submodule(model, path) if path else None
    if train is not False or type(user) not in classes or user.p != p:
        return None
    x_val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    if ranks and not (isinstance(x_val, torch.Tensor) and x_val.dim() == ranks[type(user)]):
        return None
    holder = _submodule(root, path)
    if holder is not None:
        return (path, holder) if type(holder) is type(user) else None
    return path, type(user)(p=p, inplace=user.inplace).train(False)


def _switchable(graph: torch.fx.Graph, model: nn.Module, root: nn.Module) -> None:
    """BatchNorm and dropout nodes of eval-mode modules become calls of modules (train() works)."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.batch_norm.default:
            found = _batch_norm_module(node, model, root)
        elif node.target in _DROPOUT:
            found = _dropout_module(node, model, root)
        else:
            continue
        if found is None:
            continue
        path, module = found
        _place(root, path, module)
        with graph.inserting_before(node):
            call = graph.call_module(path, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)


def _plain_module(model: nn.Module, exported: torch.fx.GraphModule, call_spec, checks: list) -> torch.fx.GraphModule:
    old = exported.graph
    graph = torch.fx.Graph()
    outputs = graph.graph_copy(old, {})
    plain = _flat_inputs(call_spec.in_spec) and (call_spec.out_spec is None or _plain_spec(call_spec.out_spec))
    if plain:
        flat = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        graph.output(pytree.tree_unflatten(flat, call_spec.out_spec) if call_spec.out_spec is not None else outputs)
    else:
        graph.output(outputs)
        graph.set_codegen(old._codegen)
    root = nn.Module()
    for k in ("_modules", "_parameters", "_buffers"):
        root.__dict__[k] = dict(exported.__dict__[k])
    root._non_persistent_buffers_set = set(exported._non_persistent_buffers_set)
    for k, v in vars(exported).items():
        if isinstance(v, torch.Tensor) and k not in root.__dict__:
            root.__dict__[k] = v
    _switchable(graph, model, root)
    insert_checks(graph, checks)
    for node in graph.nodes:
        node.meta = {k: node.meta[k] for k in _KEEP_META if k in node.meta}
    graph.lint()
    gm = torch.fx.GraphModule(root, graph, type(model).__name__)
    return gm.train(False)


def export_module(model: nn.Module, inputs: Sequence) -> torch.fx.GraphModule:
    """The plain ``GraphModule`` of ``model`` traced by ``torch.export`` (see the module docstring),
    as dynamic as the model allows; warns when it is less dynamic than asked.

    Parameters and buffers are the model's own tensors; ``model`` should be in eval mode.
    """
    inputs = tuple(inputs)
    names, flat = _input_names(model, inputs), pytree.tree_leaves(inputs)
    reasons: list[str] = []
    key = (type(model), tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in flat))
    on_meta = any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers())
    for label, example, dynamic, doubled in _tries(inputs):
        static = dynamic is None
        if on_meta and not static:  # a dynamic graph is accepted only once it ran on the example
            reasons.append(f"{label}: the model is on the meta device, where the graph cannot be run to check it")
            continue
        if label == _DYNAMIC_SIZES and key in _OUT_OF_TIME:
            reasons.append(f"{label}: {_gave_up(DYNAMIC_SECONDS)} before, for this class and these shapes")
            continue
        try:
            with _time_box(DYNAMIC_SECONDS if label == _DYNAMIC_SIZES else None):
                program = torch.export.export(model, example, dynamic_shapes=dynamic, strict=False)
                exported = program.module(check_guards=False)
        except Exception as exc:
            if static:
                raise
            late = _out_of_time(exc)
            if late:
                _OUT_OF_TIME.add(key)
            reasons.append(f"{label}: {late or _why_not(exc)}")
            continue
        placeholders = exported.graph.find_nodes(op="placeholder")
        checks, why = input_checks(program, placeholders, pytree.tree_leaves(example), flat, names, static)
        gm = _plain_module(model, exported, program.call_spec, checks) if checks is not None else None
        if gm is not None and doubled:
            why = _differs(gm, model, inputs)  # export assumes dynamic dims are not 1: check the example
        if gm is None or why:
            reasons.append(f"{label}: {why}")
            continue
        if reasons:
            got = "fixed to the example's shapes" if static else "dynamic in the batch only"
            warnings.warn(f"the torch.export graph of {type(model).__name__} is {got} ({'; '.join(reasons)})", stacklevel=4)
        gm.meta["surgery_static_batch"] = static  # calibration batches must then match the example's
        return gm
    raise AssertionError("unreachable: the static try raises or is accepted")
