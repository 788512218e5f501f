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

import torch
import torch.fx
from torch import nn

from ..errors import TraceError
from .shapes import fast_function_value, fast_module_value

__all__ = ["trace_module", "normalize_inputs", "DEFAULT_LEAF_MODULES"]

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
def _eval_mode(model: nn.Module):
    """Trace in eval mode (the branch users deploy) and restore every module's flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _user_frame(exc: BaseException) -> str:
    """'file:line `code`' of the innermost frame outside torch, where tracing broke."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)]
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


def _symbolic_trace(model: nn.Module, leaf_modules: Iterable) -> torch.fx.GraphModule:
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
    name = type(model).__name__
    return torch.fx.GraphModule(tracer.root, graph, name)


class _ShapeRunner(torch.fx.Interpreter):
    """Runs the graph and records each node's value under ``node.meta['val']``."""

    def call_module(self, target, args, kwargs):
        value = fast_module_value(self.fetch_attr(target), args, kwargs)
        return value if value is not None else super().call_module(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        value = fast_function_value(target, args, kwargs)
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


class _Runner(nn.Module):
    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *args):
        return _ShapeRunner(self.gm).run(*args)


def _propagate(gm: torch.fx.GraphModule, inputs: Sequence) -> None:
    meta_inputs = tuple(torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x for x in inputs)
    state = {f"gm.{k}": v.to("meta") for k, v in gm.state_dict(keep_vars=True).items()}
    runner = _Runner(gm)
    with torch.no_grad():
        try:
            torch.func.functional_call(runner, state, meta_inputs, strict=False, tie_weights=False)
            return
        except TraceError:
            pass  # an op without a meta kernel or with data-dependent shapes: run for real below
        try:
            runner(*inputs)
        except TraceError:
            raise
        except Exception as exc:
            raise TraceError(f"the model does not run on its example inputs: {exc}".splitlines()[0]) from exc


def _export_trace(model: nn.Module, inputs: tuple, fx_error: TraceError) -> torch.fx.GraphModule:
    """Second front end: ``torch.export`` (aten-level graph, parameters as ``get_attr``).

    Used where symbolic tracing fails, e.g. Python control flow on shapes, which export specialises
    to the example inputs. The aten op rules in ``rules/aten.py`` read the same graph structure.
    """
    try:
        program = torch.export.export(model, tuple(inputs), strict=False)
        gm = program.module()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(f"{fx_error} (torch.export fallback also failed: {first})") from exc
    gm.meta["surgery_frontend"] = "export"
    return gm


def trace_module(model: nn.Module, example_inputs, leaf_modules: Iterable = (), fallback: bool = True) -> torch.fx.GraphModule:
    """Trace ``model`` with ``torch.fx`` and record every node's value on the meta device.

    Where symbolic tracing fails and ``fallback`` is true, ``torch.export`` is tried instead.

    The returned ``GraphModule`` shares submodules with ``model``; callers that change it copy first.

    Examples
    --------
    >>> import torch
    >>> gm = trace_module(torch.nn.Conv2d(3, 8, 3), torch.randn(1, 3, 8, 8))
    >>> [tuple(n.meta["val"].shape) for n in gm.graph.nodes if n.op == "call_module"]
    [(1, 8, 6, 6)]
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    inputs = normalize_inputs(example_inputs)
    with _eval_mode(model):
        try:
            gm = _symbolic_trace(model, leaf_modules)
        except TraceError as fx_error:
            if not fallback:
                raise
            gm = _export_trace(model, inputs, fx_error)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(inputs) > len(placeholders):
            raise TraceError(f"{len(inputs)} example inputs given but the model's forward takes {len(placeholders)}")
        _propagate(gm, inputs)
    return gm
