"""What a dense checkpoint or a whole-module pickle may name, resolved by qualified name.

Nothing here imports a module that is not on an allowed prefix, and nothing calls what it resolves:
a dense checkpoint can only name

* module classes from ``torch.nn`` and ``torchvision.ops`` (rebuilt with ``cls.__new__`` plus plain
  attributes, no constructor runs);
* graph functions: ``torch`` tensor ops, ``torch.nn.functional``, ``operator``, ``math``, a few
  builtins, ``torch.sym_*`` size arithmetic, ``torch.ops.aten``/``torch.ops.torchvision`` overloads
  (public names, plus a fixed list of private aten ops that ``torch.export`` emits) and functions defined in
  ``torchvision.ops`` / ``torchvision.models`` modules (torchvision's fx-wrapped helpers);
* tensor methods (``call_method``) and public tensor attributes (``getattr``).

Anything else raises :class:`~surgery.errors.ModelLoadError` on load (or ``SurgeryError`` on save,
so that a checkpoint that could not be read back is never written).

The model's own class tree (:mod:`surgery._module_codec`) names classes and functions as
``module:QualName``; :func:`resolve_name` imports ``module`` only inside :data:`CLASS_PACKAGES`
unless the caller trusts the file, never ``__main__``, and refuses names that are not dotted
identifiers.
"""

from __future__ import annotations

import builtins
import importlib
import math
import operator
import re
import types

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .errors import ModelLoadError

__all__ = [
    "qualified_name", "resolve_module_class", "module_class_allowed", "function_name", "resolve_function",
    "check_method", "check_getattr", "resolve_pickle_global", "CLASS_PACKAGES", "object_name", "resolve_name",
]

#: Module classes a dense checkpoint may rebuild.
MODULE_PREFIXES = ("torch.nn.", "torchvision.ops.", "surgery.layers.")
#: Globals a whole-module pickle may name without ``trust`` (classes only; fx is excluded: its
#: GraphModule pickles carry Python source that is exec'd on load).
PICKLE_PREFIXES = ("torch.nn.", "torchvision.models.", "torchvision.ops.", "surgery.")
_PICKLE_EXTRA = {"functools.partial"}
#: Besides modules, torchvision's detectors hold plain helper objects (box coders, matchers, level
#: mappers) and box-arithmetic functions; classes defined in these packages, and the public functions
#: of ``torchvision.ops.boxes``, may be named by a pickle without trust.
_PLAIN_CLASS_PACKAGES = ("torchvision.models.detection.", "torchvision.ops.")

_BUILTINS = {"getattr", "len", "abs", "min", "max", "int", "float", "bool", "round"}
_OPERATOR_DENY = {"attrgetter", "methodcaller", "call"}
_TORCH_DENY = {"from_file", "load", "save"}
_METHOD_DENY = {"apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook", "backward"}
_CONTAINER_METHODS = {"keys", "values", "items", "get", "index", "count"}
_OP_NAMESPACES = {"aten", "torchvision"}
#: Higher-order ops of ``torch.export`` graphs whose only callable argument is a stored sub-graph
_HIGHER_ORDER = {"wrap_with_set_grad_enabled"}
#: Private aten ops that ``torch.export`` graphs hold; other names starting with ``_`` stay refused.
_PRIVATE_ATEN = {
    "_assert_scalar", "_assert_async", "_assert_tensor_metadata", "_to_copy", "_unsafe_view", "_softmax",
    "_log_softmax", "_native_batch_norm_legit_no_training", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d",
}
#: Bitwise aten ops whose names are dunders (attention masks of exported transformers: ``aten.__and__``).
_DUNDER_ATEN = {"__and__", "__or__", "__xor__", "__lshift__", "__rshift__"}
#: Size arithmetic of graphs with symbolic shapes (``torch.sym_max(s0, 1)``).
_TORCH_SYM = {"sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum"}


def qualified_name(obj) -> str:
    """``module.QualName`` of a class or function."""
    return f"{obj.__module__}.{obj.__qualname__}"


def _import_allowed(modname: str, prefixes: tuple[str, ...]):
    if not any(modname == p.rstrip(".") or modname.startswith(p) for p in prefixes):
        return None
    try:
        return importlib.import_module(modname)
    except ImportError:
        return None


def resolve_module_class(name: str, prefixes: tuple[str, ...] = MODULE_PREFIXES) -> type | None:
    """The ``nn.Module`` subclass called ``name`` if it is on the allow-list, else ``None``."""
    modname, _, attr = name.rpartition(".")
    mod = _import_allowed(modname, prefixes)
    cls = getattr(mod, attr, None) if mod is not None else None
    if not isinstance(cls, type) or not issubclass(cls, nn.Module) or issubclass(cls, torch.fx.GraphModule):
        return None
    if issubclass(cls, torch.jit.ScriptModule) or cls.__module__ != modname:
        return None
    return cls


def module_class_allowed(cls: type) -> bool:
    """Whether instances of ``cls`` can be stored in (and rebuilt from) a dense checkpoint."""
    return cls is nn.Module or resolve_module_class(qualified_name(cls)) is cls


def resolve_pickle_global(name: str):
    """The object a ``weights_only`` unpickler may use for the global ``name`` without trust, or ``None``."""
    if name in _PICKLE_EXTRA:
        modname, _, attr = name.rpartition(".")
        return getattr(importlib.import_module(modname), attr)
    modname, _, attr = name.rpartition(".")
    if modname.startswith(_PLAIN_CLASS_PACKAGES) and not attr.startswith("_"):
        mod = _import_allowed(modname, _PLAIN_CLASS_PACKAGES)
        obj = getattr(mod, attr, None) if mod is not None else None
        if isinstance(obj, type) and obj.__module__ == modname and not issubclass(obj, torch.fx.GraphModule):
            return obj
        if modname == "torchvision.ops.boxes" and callable(obj) and getattr(obj, "__module__", "") == modname:
            return obj
    return resolve_module_class(name, PICKLE_PREFIXES)


def _torch_functions() -> set[str]:
    names = {n for n in dir(torch._C._VariableFunctions) if not n.startswith("_")}
    names |= set(torch.functional.__all__) | {"_assert", "flatten"}
    return {n for n in names - _TORCH_DENY if not n.startswith("set_")}


_TORCH_FUNCS = _torch_functions()


def _function_allowed(name: str):
    """Resolve ``name`` (as fx's ``_get_qualified_name`` spells it) or return ``None``."""
    if "." not in name:
        return getattr(builtins, name) if name in _BUILTINS else None
    modname, _, attr = name.rpartition(".")
    public = not attr.startswith("_")
    if modname in ("operator", "_operator"):
        return getattr(operator, attr, None) if public and attr not in _OPERATOR_DENY else None
    if modname == "math":
        return getattr(math, attr, None) if public else None
    if modname == "torch":
        return getattr(torch, attr, None) if attr in _TORCH_FUNCS or attr in _TORCH_SYM else None
    if modname == "torch.functional":
        return getattr(torch.functional, attr, None) if attr in torch.functional.__all__ else None
    if modname == "torch.nn.functional":
        return getattr(F, attr, None) if public else None
    if modname == "torch._C._nn":
        return getattr(torch._C._nn, attr, None) if public else None
    if modname == "torch.Tensor":
        return getattr(torch.Tensor, attr, None) if _method_ok(attr) else None
    if modname == "torch.ops.higher_order":  # runs a stored sub-graph (checked like the graph) under no_grad
        return getattr(torch.ops.higher_order, attr) if attr in _HIGHER_ORDER else None
    if modname.startswith("torch.ops."):
        return _resolve_op(name)
    if modname.startswith(("torchvision.ops", "torchvision.models")):
        mod = _import_allowed(modname, ("torchvision.ops", "torchvision.models"))
        fn = getattr(mod, attr, None) if mod is not None else None
        return fn if isinstance(fn, types.FunctionType) and fn.__module__ == modname else None
    return None


def _resolve_op(name: str):
    parts = name.split(".")[2:]  # torch.ops.<ns>.<op>[.<overload>]
    if len(parts) not in (2, 3) or parts[0] not in _OP_NAMESPACES:
        return None
    private = parts[0] == "aten" and (parts[1] in _PRIVATE_ATEN or parts[1] in _DUNDER_ATEN)
    if any(p.startswith("_") for p in parts[2 if private else 1:]):
        return None
    if parts[0] == "torchvision":
        _import_allowed("torchvision.ops", ("torchvision.ops",))  # registers the torchvision ops
    obj = torch.ops
    try:
        for p in parts:
            obj = getattr(obj, p)
    except (AttributeError, RuntimeError):
        return None
    return obj if isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) else None


def function_name(fn) -> str:
    """Qualified name under which ``fn`` is stored; raises ``ValueError`` if it is not allow-listed."""
    if isinstance(fn, torch._ops.OpOverload):
        name = f"torch.ops.{fn.namespace}.{fn._opname}.{fn._overloadname}"
    elif isinstance(fn, torch._ops.OpOverloadPacket):
        name = f"torch.ops.{fn._qualified_op_name.replace('::', '.')}"
    else:
        name = torch.fx.node._get_qualified_name(fn)
    if _function_allowed(name) is not fn:
        raise ValueError(f"function {name} is not on the checkpoint allow-list")
    return name


def resolve_function(name: str):
    """The allow-listed callable stored as ``name``; raises :class:`ModelLoadError` otherwise."""
    fn = _function_allowed(name) if isinstance(name, str) else None
    if fn is None:
        raise ModelLoadError(f"checkpoint calls {name!r}, which is not on the allow-list")
    return fn


def _method_ok(name: str) -> bool:
    if not isinstance(name, str) or name.startswith("_") or name in _METHOD_DENY:
        return False
    return name in _CONTAINER_METHODS or callable(getattr(torch.Tensor, name, None))


def check_method(name) -> str:
    """``name`` if it is a public tensor method a graph may call; raises :class:`ModelLoadError`."""
    if not _method_ok(name):
        raise ModelLoadError(f"checkpoint calls method {name!r}, which is not on the allow-list")
    return name


def check_getattr(attr) -> None:
    """Graph ``getattr`` calls may read public tensor attributes only."""
    if not isinstance(attr, str) or attr.startswith("_") or not hasattr(torch.Tensor, attr) or attr in _METHOD_DENY:
        raise ModelLoadError(f"checkpoint reads attribute {attr!r}, which is not on the allow-list")


# -- the model's own classes, by name ----------------------------------------------------------
#: Packages whose modules a checkpoint may import to rebuild a model's own class without trust.
CLASS_PACKAGES = ("torch", "torchvision", "timm", "transformers", "surgery")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def object_name(obj) -> str | None:
    """``module:QualName`` under which :func:`resolve_name` finds ``obj`` again, or ``None`` (a lambda,
    a class made inside a function, a bound method). Imports nothing."""
    import sys

    modname = getattr(obj, "__module__", None)
    mod = sys.modules.get(modname) if isinstance(modname, str) else None
    if mod is None:
        return None
    for qual in (getattr(obj, "__qualname__", None), getattr(obj, "__name__", None)):
        if not isinstance(qual, str) or not _DOTTED.fullmatch(qual):
            continue
        found = mod
        for part in qual.split("."):
            found = getattr(found, part, None)
        if found is obj:
            return f"{modname}:{qual}"
    return None


def resolve_name(name, trust: bool = False) -> tuple[object | None, str]:
    """``(object, "")`` for a ``module:QualName`` (or ``module.Name``) stored by :func:`object_name`,
    else ``(None, why not)``: outside :data:`CLASS_PACKAGES` without ``trust``, in ``__main__``, not
    importable. A name that is not made of dotted identifiers, or has a ``__dunder__`` part, raises
    :class:`ModelLoadError`: no save writes one."""
    text = name if isinstance(name, str) else ""
    modname, sep, qual = text.partition(":")
    if not sep:
        modname, _, qual = text.rpartition(".")
    parts = modname.split(".") + qual.split(".")
    if len(text) > 300 or not _DOTTED.fullmatch(modname) or not _DOTTED.fullmatch(qual) or (
            modname != "__main__" and any(p.startswith("__") for p in parts)):
        raise ModelLoadError(f"checkpoint names {str(name)[:80]!r}, which is not a qualified class or function name")
    if modname == "__main__":
        return None, f"{text} is defined in a script (__main__), which is never imported by name; define it in a module"
    if parts[0] not in CLASS_PACKAGES and not trust:
        return None, (f"{text} is outside the packages imported without trust ({', '.join(CLASS_PACKAGES)}); "
                      f"load with trust=True (CLI --trust) if you trust this file")
    try:
        found = importlib.import_module(modname)
    except Exception as exc:  # an import can fail in any way; the reason is one line
        first = (str(exc).strip().splitlines() or [""])[0]
        return None, f"cannot import {modname} ({type(exc).__name__}: {first})"
    for part in qual.split("."):
        found = getattr(found, part, None)
    if found is None:
        return None, f"{modname} has no {qual}"
    return found, ""
