"""The arguments of an fx node, normalised once for every op rule.

A rule asks for an argument by its name in the op's signature (``ctx.arg(2, "dim", 0)``). Whether
the call site passed it by position or by keyword does not matter, and a dim argument comes back
non-negative, resolved against the rank of the op's input. The signature comes from the op itself:

* ``torch.ops.aten`` overloads and builtin torch functions: their TorchScript schemas (every
  overload; the one whose parameter types match the argument values is chosen);
* Python functions (``torch.split``, ``F.embedding``, torchvision ops): ``inspect.signature``;
* tensor methods: the Python method where there is one (``Tensor.split``), else the aten schemas;
* modules: the signature of ``forward``.

The first parameter of a method or schema (``self``, ``tensor``) is called ``input``, so one rule
serves ``torch.split(tensor=...)``, ``x.split(...)`` and ``aten.split.Tensor(self, ...)``; a rule
registration may rename further parameters (``aten.embedding`` calls its index tensor ``indices``).
Where no signature binds (``x.view(2, 3, 4)`` against ``view(self, int[] size)``), the raw
positional and keyword arguments are used as before.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import types
import typing

import torch
import torch.fx
from torch import nn
from torch._jit_internal import boolean_dispatched
from torch.fx.operator_schemas import get_signature_for_torch_op

__all__ = ["NodeArgs", "MISSING", "DIM_NAMES"]

MISSING = object()

#: parameters that name a dim of the op's input (resolved to ``0 .. rank-1``)
DIM_NAMES = frozenset({"dim", "dim0", "dim1", "dims", "start_dim", "end_dim", "source", "destination", "axis"})
#: ops whose dim argument counts the dims of the output (one more than the input's)
_DIM_OF_OUTPUT = frozenset({"unsqueeze", "unsqueeze_", "stack"})
_FIRST_NAMES = ("self", "tensor")


def _op_name(target) -> str:
    if isinstance(target, str):
        return target
    packet = getattr(target, "overloadpacket", None)
    return packet.__name__ if packet is not None else getattr(target, "__name__", "")


def _signatures(op: str, target) -> tuple[inspect.Signature, ...]:
    try:
        return _cached_signatures(op, target)
    except TypeError:  # unhashable target
        return ()


@functools.lru_cache(maxsize=None)
def _cached_signatures(op: str, target) -> tuple[inspect.Signature, ...]:
    if op == "call_module":
        try:
            sig = inspect.signature(target.forward)
        except (TypeError, ValueError):
            return ()
        params = list(sig.parameters.values())[1:]  # drop self
        return (sig.replace(parameters=params),)
    if op == "call_method":
        method = getattr(torch.Tensor, target, None)
        if inspect.isfunction(method):
            return (inspect.signature(method),)
        packet = getattr(torch.ops.aten, target, None)
        return tuple(get_signature_for_torch_op(packet) or ()) if packet is not None else ()
    if op != "call_function":
        return ()
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) or inspect.isbuiltin(target):
        try:
            return tuple(get_signature_for_torch_op(target) or ())
        except Exception:  # noqa: BLE001  (ops without a TorchScript schema)
            return ()
    if target in boolean_dispatched:
        target = boolean_dispatched[target]["if_true"]
    try:
        return (inspect.signature(inspect.unwrap(target)),)
    except (TypeError, ValueError):
        return ()


def _value(x):
    return x.meta.get("val") if isinstance(x, torch.fx.Node) else x


def _matches(annotation, x) -> bool:
    """False only where the value clearly cannot be of the annotated type (picks an overload)."""
    if annotation is inspect.Parameter.empty or isinstance(annotation, (str, typing.TypeVar)):
        return True
    v = _value(x)
    if isinstance(x, torch.fx.Node) and v is None:
        return True  # value not recorded: do not guess
    origin, params = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(a, x) for a in params)
    if annotation is type(None):
        return v is None
    if annotation is torch.Tensor:
        return isinstance(v, torch.Tensor)
    if isinstance(v, torch.Tensor):
        return annotation in (typing.Any, object)
    if origin in (list, tuple, collections.abc.Sequence):
        if isinstance(v, (int, float)) and not isinstance(v, bool):  # ``int[1] dim`` accepts one int
            return not params or _matches(params[0], x)
        if not isinstance(v, (list, tuple)):
            return False
        return not params or all(_matches(params[0], e) for e in v)
    if annotation is int:
        return isinstance(v, int) or type(v).__name__ == "SymInt"
    if annotation is float:
        return isinstance(v, (int, float)) or type(v).__name__ in ("SymInt", "SymFloat")
    if annotation is bool:
        return isinstance(v, bool)
    if annotation is str:
        return isinstance(v, str)
    return True


def _bind(sigs, args, kwargs):
    for sig in sigs:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            continue
        params = sig.parameters
        if all(
            params[name].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            and _matches(params[name].annotation, value)
            for name, value in bound.arguments.items()
        ):
            return sig, bound
    return None, None


class NodeArgs:
    """The arguments of one node by parameter name (bound lazily, once)."""

    def __init__(self, node: torch.fx.Node, module: nn.Module | None = None, aliases: dict | None = None):
        self.node = node
        self._module = module
        self._aliases = aliases or {}
        self._ready = False

    def _load(self) -> None:
        if self._ready:
            return
        self._ready = True
        node = self.node
        self.names: tuple[str, ...] | None = None
        target = type(self._module) if node.op == "call_module" and self._module is not None else node.target
        sig, bound = _bind(_signatures(node.op, target), node.args, node.kwargs)
        if sig is None:
            return
        original = tuple(sig.parameters)
        names = [self._aliases.get(n, n) for n in original]
        if "input" not in names and names and names[0] in _FIRST_NAMES:
            names[0] = "input"
        self.names = tuple(names)
        self.original = dict(zip(names, original))
        self.given = {names[original.index(k)]: v for k, v in bound.arguments.items()}
        self.positional = {n: i for i, (n, p) in enumerate(zip(names, sig.parameters.values()))
                           if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)}

    # -- reading ----------------------------------------------------------------------------
    def _raw(self, index, name, default):
        node = self.node
        if index is not None and index < len(node.args):
            return node.args[index]
        if name is not None and name in node.kwargs:
            return node.kwargs[name]
        if default is MISSING:
            raise KeyError(f"{node.format_node()} has no argument {name or index}")
        return default

    def canonical(self, index: int | None, name: str | None) -> str | None:
        """The canonical name of the parameter a rule means by ``(index, name)``, or None (unbound)."""
        self._load()
        if self.names is None:
            return None
        if name is not None and name in self.names:
            return name
        by_position = [n for n, i in self.positional.items() if i == index]
        return by_position[0] if by_position else name

    def get(self, index: int | None, name: str | None = None, default=MISSING):
        """Argument ``name`` (or, where the signature has no such name, the one at ``index``)."""
        key = self.canonical(index, name)
        if key is None:
            value = self._raw(index, name, default)
        elif key in self.given:
            value = self.given[key]
        elif default is MISSING:
            raise KeyError(f"{self.node.format_node()} has no argument {name or index}")
        else:
            value = default
        if (key or name) in DIM_NAMES:
            value = self._resolve_dims(value)
        return value

    def _rank(self) -> int | None:
        if _op_name(self.node.target) in _DIM_OF_OUTPUT:
            out = self.node.meta.get("val")
            return out.dim() if isinstance(out, torch.Tensor) else None
        self._load()
        if self.names is not None and "input" in self.given:
            first = self.given["input"]
        elif self.names is not None and self.given:
            first = next(iter(self.given.values()))
        else:
            first = self.node.args[0] if self.node.args else None
        v = _value(first)
        if isinstance(v, (list, tuple)) and v:
            v = _value(v[0])
        return v.dim() if isinstance(v, torch.Tensor) else None

    def _resolve_dims(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
            return value
        ints = [value] if isinstance(value, int) else list(value)
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in ints):
            return value
        rank = self._rank()
        if not rank:
            return value
        resolved = [d % rank if -rank <= d < rank else d for d in ints]
        return resolved[0] if isinstance(value, int) else type(value)(resolved)

    # -- writing (rewrite) ------------------------------------------------------------------
    def slot(self, index: int | None, name: str | None) -> tuple[str, object]:
        """Where argument ``(index, name)`` sits in the node: ``("arg", i)`` or ``("kwarg", key)``."""
        key = self.canonical(index, name)
        node = self.node
        if key is None or key not in self.original:
            if index is not None and index < len(node.args):
                return "arg", index
            if name is not None:
                return "kwarg", name
            raise KeyError(index)
        original = self.original[key]
        pos = self.positional.get(key)
        if original not in node.kwargs and pos is not None and pos < len(node.args):
            return "arg", pos
        return "kwarg", original
