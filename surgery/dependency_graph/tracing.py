"""Front end: ``torch.fx`` symbolic trace plus shape propagation on meta tensors.

Every node of the returned ``GraphModule`` carries ``node.meta["val"]``: the value the node produced,
with tensors on the ``meta`` device (no storage, no FLOPs). This is the same key ``torch.export``
uses for its fake values, so the dependency-graph builder reads one key whichever front end made the
graph.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from ..errors import TraceError
from .shapes import fast_function_value, fast_module_value

__all__ = ["eval_mode", "Traced", "trace_graph", "trace_module", "propagate", "normalize_inputs", "DEFAULT_LEAF_MODULES"]

#: Modules fx must not enter; each has its own op rule.
DEFAULT_LEAF_MODULES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention, nn.RNNBase)


def normalize_inputs(example_inputs) -> tuple:
    """Example inputs as a tuple (a single tensor becomes a 1-tuple)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise TraceError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


class _Tracer(torch.fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str]):
        super().__init__()
        self._leaf_types = leaf_types
        self._leaf_names = leaf_names

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self._leaf_types) or qualname in self._leaf_names:
            return True
        return super().is_leaf_module(m, qualname)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode for the duration (traces take the branch users deploy); every module's own
    training flag is restored afterwards, so the user's model is left as it was."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _user_frame(exc: BaseException) -> str:
    """'file:line `code`' of the innermost frame outside torch and surgery, where tracing broke.

    Directories are matched with their trailing separator: torchvision's, torchaudio's (and the
    user's) files are the user's code here, though their paths start with torch's directory name.
    """
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # surgery/
    own = (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep, package + os.sep)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not os.path.abspath(f.filename).startswith(own)]
    if not frames:
        return ""
    f = frames[-1]
    code = (f.line or linecache.getline(f.filename, f.lineno)).strip()
    return f" at {f.filename}:{f.lineno} `{code}`"


def _leaf_options(leaf_modules: Iterable) -> tuple[tuple[type, ...], frozenset[str]]:
    types, names = list(DEFAULT_LEAF_MODULES), set()
    for item in leaf_modules or ():
        if isinstance(item, str):
            names.add(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        else:
            raise TraceError(f"leaf_modules entries must be module classes or qualified names, got {item!r}")
    return tuple(types), frozenset(names)


@dataclass
class Traced:
    """A traced model: the fx graph (every node with ``meta['val']``) and the module it calls into.

    ``root`` is the user's model itself for the fx front end (nothing is copied); a ``GraphModule``
    is only built when one is needed (``to_graph_module``), since building one costs more than
    tracing on deep models.
    """

    root: nn.Module
    graph: torch.fx.Graph
    frontend: str  # "fx" or "export"
    name: str

    def to_graph_module(self) -> torch.fx.GraphModule:
        gm = torch.fx.GraphModule(self.root, self.graph, self.name)
        gm.meta["surgery_frontend"] = self.frontend
        return gm


def _symbolic_trace(model: nn.Module, leaf_modules: Iterable) -> Traced:
    types, names = _leaf_options(leaf_modules)
    tracer = _Tracer(types, names)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many kinds; all mean "not symbolically traceable"
        where = _user_frame(exc)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(
            f"cannot trace {type(model).__name__}: {first}{where}; make the module that contains this code "
            f"a leaf (leaf_modules=[...], CLI --leaf NAME)"
        ) from exc
    return Traced(tracer.root, graph, "fx", type(model).__name__)


class _ShapeRunner(torch.fx.Interpreter):
    """Runs the graph and records each node's value under ``node.meta['val']``.

    With ``meta=True`` parameters are read as meta tensors: layers with a shape formula
    (``shapes.py``) never touch them, other leaf modules run on meta copies of their own state.
    """

    def __init__(self, root: nn.Module, graph: torch.fx.Graph, meta: bool):
        super().__init__(root, graph=graph)
        self.meta = meta
        self._meta_attrs: dict[str, torch.Tensor] = {}

    def fetch_attr(self, target: str):
        value = super().fetch_attr(target)
        if self.meta and isinstance(value, torch.Tensor):
            cached = self._meta_attrs.get(target)
            if cached is None:
                cached = self._meta_attrs[target] = value.detach().to("meta")
            return cached
        return value

    def call_module(self, target, args, kwargs):
        module = super().fetch_attr(target)
        if not self.meta:
            return module(*args, **kwargs)
        value = fast_module_value(module, args, kwargs)
        if value is not None:
            return value
        state = {k: v.to("meta") for k, v in module.state_dict(keep_vars=True).items()}
        return torch.func.functional_call(module, state, tuple(args), dict(kwargs), strict=False, tie_weights=False)

    def call_function(self, target, args, kwargs):
        value = fast_function_value(target, args, kwargs) if self.meta else None
        return value if value is not None else super().call_function(target, args, kwargs)

    def run_node(self, n: torch.fx.Node):
        try:
            value = super().run_node(n)
        except Exception as exc:
            raise TraceError(f"shape propagation failed at node {n.format_node()}: {exc}".splitlines()[0]) from exc
        n.meta["val"] = _detach(value)
        return value


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach() if value.device.type == "meta" else torch.empty_like(value, device="meta")
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value) if not hasattr(value, "_fields") else type(value)(*(_detach(v) for v in value))
    return value


def propagate(root: nn.Module, graph: torch.fx.Graph, inputs: Sequence) -> None:
    """Record every node's value (on the meta device) under ``node.meta['val']``.

    Runs on meta tensors; where an op has no meta kernel or its shapes depend on data, runs once
    for real on the example inputs instead.
    """
    meta_inputs = tuple(torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x for x in inputs)
    with torch.no_grad():
        try:
            _ShapeRunner(root, graph, meta=True).run(*meta_inputs)
            return
        except TraceError:
            pass  # an op without a meta kernel or with data-dependent shapes: run for real below
        try:
            _ShapeRunner(root, graph, meta=False).run(*inputs)
        except TraceError:
            raise
        except Exception as exc:
            raise TraceError(f"the model does not run on its example inputs: {exc}".splitlines()[0]) from exc


def _export_trace(model: nn.Module, inputs: tuple, fx_error: TraceError) -> Traced:
    """Second front end: ``torch.export`` (aten-level graph, parameters as ``get_attr``).

    Used where symbolic tracing fails, e.g. Python control flow on shapes. ``exporting.py`` makes
    the batch (and other dims where the model allows) dynamic, keeps BatchNorm and dropout switchable
    by ``train()`` and returns a plain ``GraphModule``. The aten op rules in ``rules/aten.py`` read
    the same graph structure.
    """
    from .exporting import export_module

    try:
        gm = export_module(model, tuple(inputs))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(f"both front ends failed. torch.fx: {fx_error}. torch.export: {first}{_user_frame(exc)}") from exc
    return Traced(gm, gm.graph, "export", type(model).__name__)


def trace_graph(model: nn.Module, example_inputs, leaf_modules: Iterable = (), fallback: bool = True) -> Traced:
    """Trace ``model`` (fx, else ``torch.export`` when ``fallback``) and record every node's value.

    The result refers to ``model``'s own submodules; callers that change anything copy first.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    inputs = normalize_inputs(example_inputs)
    with eval_mode(model):
        try:
            traced = _symbolic_trace(model, leaf_modules)
        except TraceError as fx_error:
            if not fallback:
                raise
            traced = _export_trace(model, inputs, fx_error)
        placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
        if len(inputs) > len(placeholders):
            raise TraceError(f"{len(inputs)} example inputs given but the model's forward takes {len(placeholders)}")
        propagate(traced.root, traced.graph, inputs)
    return traced


def trace_module(model: nn.Module, example_inputs, leaf_modules: Iterable = (), fallback: bool = True) -> torch.fx.GraphModule:
    """Trace ``model`` into a ``GraphModule`` whose nodes carry their meta values.

    The returned ``GraphModule`` shares submodules with ``model``; callers that change it copy first.

    Examples
    --------
    >>> import torch
    >>> gm = trace_module(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), torch.randn(1, 3, 8, 8))
    >>> [tuple(n.meta["val"].shape) for n in gm.graph.nodes if n.op == "call_module"]
    [(1, 8, 6, 6)]
    """
    return trace_graph(model, example_inputs, leaf_modules, fallback).to_graph_module()
