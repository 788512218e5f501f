"""Front end: ``torch.fx`` symbolic trace plus shape propagation on meta tensors.

Every node of the returned ``GraphModule`` carries ``node.meta["val"]``: the value the node produced,
with tensors on the ``meta`` device (no storage, no FLOPs). This is the same key ``torch.export``
uses for its fake values, so the dependency-graph builder reads one key whichever front end made the
graph.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import linecache
import os
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from ..errors import TraceError
from .rules._registry import is_leaf
from .shapes import fast_function_value, fast_module_value

__all__ = ["eval_mode", "Traced", "trace_graph", "trace_module", "propagate", "normalize_inputs"]

#: how many modules fx may fall back to calling whole after failing to trace through them
_MAX_LEAF_RETRIES = 16
#: pure torch helpers that fx records as calls instead of entering, as (module, name):
#: ``nn.TransformerEncoder`` asks ``_get_seq_len`` (``is_nested``, ``len(size())``) for a sequence
#: length it only needs for a mask; calls whose result is unused are dropped
_WRAPPED = ((nn.modules.transformer, "_get_seq_len"),)
_AUTOWRAP = tuple(getattr(m, name) for m, name in _WRAPPED if hasattr(m, name))


def normalize_inputs(example_inputs) -> tuple:
    """Example inputs as a tuple (a single tensor becomes a 1-tuple)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise TraceError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


class _Tracer(torch.fx.Tracer):
    """Leaves come from the rule registry: a module is called as one node iff it has a module rule
    (``rules._registry.is_leaf``) or the user listed it; every other module is entered, torch's own
    composites (``nn.TransformerEncoderLayer``, ...) included. ``entered`` is the stack of modules
    being entered; after a failed trace it names the modules the failure happened in."""

    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_names: frozenset[str] = frozenset()):
        super().__init__()  # defaults: torch.load rebuilds a pickled GraphModule with tracer_cls()
        self._leaf_types = leaf_types
        self._leaf_names = leaf_names
        self.entered: list[tuple[str, nn.Module]] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaf_types) or qualname in self._leaf_names or is_leaf(m)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        qualname = self.path_of_module(m)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        self.entered.append((qualname, m))
        out = super().call_module(m, forward, args, kwargs)
        self.entered.pop()  # left in place when tracing raises: the stack says where
        return out


def _drop_unused_autowrapped(graph: torch.fx.Graph) -> None:
    for node in reversed(graph.nodes):
        if node.op == "call_function" and node.target in _AUTOWRAP and not node.users:
            graph.erase_node(node)


def _torch_composite(m: nn.Module) -> bool:
    """A torch module without a rule: fx's own default would have called it whole."""
    return m.__module__.startswith(("torch.nn", "torch.ao.nn")) and not isinstance(m, nn.Sequential)


def _recorded(fn):
    """``fn`` as fx records it: one ``call_function`` node when an argument is a proxy."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        proxies: list[torch.fx.Proxy] = []
        torch.fx.node.map_aggregate((args, kwargs), lambda a: proxies.append(a) if isinstance(a, torch.fx.Proxy) else None)
        if proxies:
            return proxies[0].tracer.create_proxy("call_function", fn, args, kwargs)
        return fn(*args, **kwargs)

    return call


@contextlib.contextmanager
def _slow_paths():
    """Trace the Python path of torch's transformer layers, not their fused fast path (whose
    conditions test tensors and flags that fx cannot evaluate), with ``_WRAPPED`` helpers recorded."""
    mha = getattr(torch.backends, "mha", None)
    before = mha.get_fastpath_enabled() if hasattr(mha, "set_fastpath_enabled") else None
    saved = [(m, name, getattr(m, name)) for m, name in _WRAPPED if hasattr(m, name)]
    try:
        if before is not None:
            mha.set_fastpath_enabled(False)
        for m, name, fn in saved:
            setattr(m, name, _recorded(fn))
        yield
    finally:
        for m, name, fn in saved:
            setattr(m, name, fn)
        if before is not None:
            mha.set_fastpath_enabled(before)


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


@contextlib.contextmanager
def without_kv_cache(model: nn.Module):
    """Hugging Face models with ``config.use_cache`` return a ``DynamicCache``, which ``torch.export``
    cannot output: they are traced with the cache off (channels do not depend on it) and every
    config is restored afterwards, so the user's model, and the pruned one, keep their setting."""
    configs = {id(c): c for m in model.modules() if isinstance(getattr(c := getattr(m, "config", None), "use_cache", None), bool)}
    saved = [(c, c.use_cache) for c in configs.values()]
    try:
        for c, _ in saved:
            c.use_cache = False
        yield
    finally:
        for c, flag in saved:
            c.use_cache = flag


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
    types, names = [], set()
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
    """fx trace with registry leaves. Where tracing fails inside a torch module that has no rule
    (``nn.Transformer`` checks shapes in Python), that module is called whole and the trace retried."""
    types, names = _leaf_options(leaf_modules)
    for _ in range(_MAX_LEAF_RETRIES + 1):
        tracer = _Tracer(types, names)
        try:
            with _slow_paths():
                graph = tracer.trace(model)
            _drop_unused_autowrapped(graph)
            return Traced(tracer.root, graph, "fx", type(model).__name__)
        except Exception as exc:  # fx raises many kinds; all mean "not symbolically traceable"
            error = exc
            inside = [q for q, m in tracer.entered if q and q not in names and _torch_composite(m)]
            if not inside:
                break
            names = names | {inside[-1]}
    where = _user_frame(error)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "co_varnames is too small" in first and _takes_var_keyword(model):
        raise TraceError(
            f"cannot trace {type(model).__name__}: torch.fx cannot enter a forward that takes **kwargs (as Hugging Face "
            f"models do), and no leaf module can help; the torch.export front end traces it instead"
        ) from error
    raise TraceError(
        f"cannot trace {type(model).__name__}: {first}{where}; make the module that contains this code "
        f"a leaf (leaf_modules=[...], CLI --leaf NAME)"
    ) from error


def _takes_var_keyword(model: nn.Module) -> bool:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


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

    def fetch_args_kwargs_from_env(self, n: torch.fx.Node):
        """Arguments as plain lists and dicts: fx's immutable containers break callees that mutate
        what they are given (torchvision's Swin 3D helpers edit their size lists)."""
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _mutable(args), _mutable(kwargs)

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
        if self.meta and target is _WRAP_GRAD and len(args) >= 2 and isinstance(args[1], torch.fx.GraphModule):
            # an export sub-graph (rotary tables) holds device constants of the trace (``_to_copy(device=cpu)``):
            # run it with this interpreter, on meta too, instead of calling it
            with torch.set_grad_enabled(bool(args[0])):
                return _ShapeRunner(args[1], args[1].graph, meta=True).run(*args[2:])
        if self.meta:  # device constants of the trace (factories, moves, metadata asserts): stay on meta
            if target is torch.ops.aten.to.device:
                args = (args[0], torch.device("meta"), *args[2:])
            if "device" in kwargs:
                kwargs = {**kwargs, "device": torch.device("meta")}
        value = fast_function_value(target, args, kwargs) if self.meta else None
        return value if value is not None else super().call_function(target, args, kwargs)

    def run_node(self, n: torch.fx.Node):
        try:
            value = super().run_node(n)
        except Exception as exc:
            raise TraceError(f"shape propagation failed at node {n.format_node()}: {exc}".splitlines()[0]) from exc
        n.meta["val"] = _detach(value)
        return value


_WRAP_GRAD = getattr(getattr(torch.ops, "higher_order", None), "wrap_with_set_grad_enabled", None)


def _mutable(value):
    """``value`` with fx's ``immutable_list`` / ``immutable_dict`` (nested too) as plain ones."""
    if isinstance(value, list):
        return [_mutable(v) for v in value]
    if isinstance(value, dict):
        return {k: _mutable(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(_mutable(v) for v in value)
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
    with eval_mode(model), without_kv_cache(model):
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
