"""The model's own module tree as plain data (JSON + named tensors) and back, without pickle.

A dense checkpoint of a model that is not a ``GraphModule`` (what :func:`surgery.apply` returns by
default: the user's ``ResNet``, timm model or block class) keeps, besides its graph, a ``tree``::

    {"modules": [entry, ...], "inputs": [{"shape": [...], "dtype": "float32"}, ...] | None,
     "unstorable": ["what could not be stored", ...]}

with one entry per module in ``named_modules`` order, the root first: ``{"path", "class":
"module:QualName", "training", "children": [names, in order], "attrs", "params", "buffers",
"tensor_attrs"}``, or ``{"path", "alias": other path}`` for a module reached twice. Attributes are
JSON values with tags (see :func:`encode_attr`): scalars, strings, tuples/lists/sets/dicts of them,
dtypes and sizes, references to classes, functions, ``functools.partial`` and enum members by
qualified name, and ``transformers`` configurations (their attributes, rebuilt like a module).
Anything else is listed in ``unstorable``; such a tree is not rebuilt.

:func:`data_to_tree` rebuilds the tree with ``cls.__new__(cls)`` + ``nn.Module.__init__`` + the
stored attributes, submodules, parameters and buffers: no constructor runs and nothing is unpickled.
Every class and function is resolved by :func:`surgery._allowlist.resolve_name` (imports only
inside the allowed packages unless ``trust``); one that cannot be resolved is returned as the reason
to fall back to the checkpoint's graph.

Examples
--------
>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 3))
>>> store = {}
>>> data = tree_to_data(net, lambda t, key: store.setdefault(key, t) is t and key, None)
>>> data["modules"][1]["class"], data["unstorable"]
('torch.nn.modules.linear:Linear', [])
>>> back, why = data_to_tree(data, store)
>>> type(back).__name__, back[0].out_features, torch.equal(back[0].weight, net[0].weight), why
('Sequential', 3, True, '')
"""

from __future__ import annotations

import enum
import functools
import types
from collections.abc import Callable

import torch
from torch import nn

from . import _allowlist as allow
from . import _graph_codec as codec
from .errors import ModelLoadError, SurgeryError

__all__ = ["tree_to_data", "data_to_tree", "encode_attr", "decode_attr", "inputs_to_data", "data_to_inputs"]

_INTERNALS = frozenset(vars(nn.Module()))
#: ``nn.Module`` bookkeeping that holds hooks: a module with any hook is not stored as a tree.
_HOOKS = frozenset(k for k, v in vars(nn.Module()).items() if isinstance(v, dict) and k not in ("_parameters", "_buffers", "_modules"))
_DERIVED = {"_flat_weights", "_flat_weight_refs"}  # RNN weight lists, rebuilt by _init_flat_weights
#: Besides the graph allow-list, where functions held as module attributes may come from without trust.
_FUNCTION_MODULES = ("timm.layers.", "transformers.activations", "surgery.layers.")


class _NotStorable(Exception):
    pass


# -- attribute values -----------------------------------------------------------------------------
def _ref(obj, what: str) -> str:
    name = allow.object_name(obj)
    if name is None:
        raise _NotStorable(f"a {what} without an importable qualified name ({getattr(obj, '__qualname__', obj)!r})")
    return name


def encode_attr(v):
    """JSON-able form of a module attribute; raises ``_NotStorable`` (with what it is) otherwise."""
    if isinstance(v, type):
        return {"$class": _ref(v, "class")}
    if isinstance(v, enum.Enum):
        return {"$enum": [_ref(type(v), "enum"), v.name]}
    if isinstance(v, functools.partial):
        return {"$partial": [encode_attr(v.func), encode_attr(list(v.args)), encode_attr(dict(v.keywords))]}
    if isinstance(v, (types.FunctionType, types.BuiltinFunctionType)):
        return {"$function": _ref(v, "function")}
    if isinstance(v, torch.Size):
        return {"$size": [int(s) for s in v]}
    if isinstance(v, tuple) and not hasattr(v, "_fields"):
        return {"$tuple": [encode_attr(x) for x in v]}
    if type(v) is list:
        return [encode_attr(x) for x in v]
    if type(v) is dict:
        if all(type(k) is str for k in v):
            return {"$dict": {k: encode_attr(x) for k, x in v.items()}}
        if all(type(k) in (int, bool, float, str, tuple) for k in v):  # HF configs' id2label: int keys
            return {"$items": [[encode_attr(k), encode_attr(x)] for k, x in v.items()]}
        raise _NotStorable("a dict with keys that are not plain values")
    if type(v) in (set, frozenset) and all(type(k) in (int, bool, float, str) for k in v):
        return {"$set" if type(v) is set else "$frozenset": [encode_attr(x) for x in sorted(v, key=repr)]}
    if _is_hf_config(type(v)):  # rebuilt like a module: __new__ + its attributes, no constructor
        return {"$config": [_ref(type(v), "configuration class"), {"$dict": {k: encode_attr(x) for k, x in vars(v).items()}}]}
    if isinstance(v, (torch.Tensor, nn.Module)) or isinstance(v, (tuple, list, dict, set, frozenset)):
        raise _NotStorable(f"a {type(v).__name__}")
    try:
        return codec.encode_value(v)
    except SurgeryError:
        raise _NotStorable(f"a {type(v).__module__}.{type(v).__qualname__}") from None


_HF_CONFIGS = {("transformers.configuration_utils", "PreTrainedConfig"),
               ("transformers.generation.configuration_utils", "GenerationConfig")}


def _is_save_guard(value) -> bool:
    from .hf.config import is_save_guard

    return is_save_guard(value)


def _is_hf_config(cls: type) -> bool:
    """A ``transformers`` model or generation configuration class (checked by name: transformers is
    not imported)."""
    return any((b.__module__, b.__name__) in _HF_CONFIGS for b in cls.__mro__)


class _Resolver:
    """Resolves stored names once each; records the first reason a name cannot be used."""

    def __init__(self, trust: bool):
        self.trust, self.why, self._seen = trust, "", {}

    def get(self, name, kind: str):
        if name not in self._seen:
            obj, why = allow.resolve_name(name, self.trust)
            if obj is not None:
                why = self._check(obj, name, kind)
            self._seen[name] = (None if why else obj, why)
        obj, why = self._seen[name]
        if why and not self.why:
            self.why = why
        return obj

    def _check(self, obj, name: str, kind: str) -> str:
        if kind == "module":
            ok = isinstance(obj, type) and issubclass(obj, nn.Module) and not issubclass(obj, (torch.fx.GraphModule, torch.jit.ScriptModule))
        elif kind == "enum":
            ok = isinstance(obj, type) and issubclass(obj, enum.Enum)
        elif kind == "class":
            ok = isinstance(obj, type)
        elif kind == "config":
            ok = isinstance(obj, type) and _is_hf_config(obj)
        else:
            ok = callable(obj) and not isinstance(obj, type) and (self.trust or _function_ok(obj, name))
        return "" if ok else f"{name} is not a {'module class' if kind == 'module' else kind} that a checkpoint may name"


def _function_ok(fn, name: str) -> bool:
    """Without trust a module attribute may name a function of the graph allow-list (torch ops,
    ``torch.nn.functional``, torchvision's fx-wrapped helpers) or an activation-style function of
    timm's layers, transformers' activations or surgery's layers: a forward may call it."""
    if allow._function_allowed(name.replace(":", ".")) is fn:
        return True
    if allow._function_allowed(f"{getattr(fn, '__module__', '')}.{getattr(fn, '__name__', '')}") is fn:
        return True
    return isinstance(fn, types.FunctionType) and fn.__module__.startswith(_FUNCTION_MODULES)


def decode_attr(v, resolve: _Resolver):
    """Inverse of :func:`encode_attr`; names that cannot be resolved decode to ``None`` and leave
    their reason in ``resolve.why``."""
    if isinstance(v, list):
        return [decode_attr(x, resolve) for x in v]
    if isinstance(v, dict) and len(v) == 1:
        (tag, x), = v.items()
        if tag == "$tuple" and isinstance(x, list):
            return tuple(decode_attr(e, resolve) for e in x)
        if tag == "$dict" and isinstance(x, dict):
            return {str(k): decode_attr(e, resolve) for k, e in x.items()}
        if tag == "$items" and isinstance(x, list):
            return {decode_attr(k, resolve): decode_attr(e, resolve) for k, e in x}
        if tag in ("$set", "$frozenset") and isinstance(x, list):
            return (set if tag == "$set" else frozenset)(decode_attr(e, resolve) for e in x)
        if tag == "$config" and isinstance(x, list) and len(x) == 2:
            cls, attrs = resolve.get(x[0], "config"), decode_attr(x[1], resolve)
            if not isinstance(attrs, dict) or any(k.startswith("__") for k in attrs):
                raise ModelLoadError(f"checkpoint configuration {str(x[0])[:80]!r} is malformed")
            if cls is None:
                return None
            config = cls.__new__(cls)
            config.__dict__.update(attrs)
            return config
        if tag == "$class":
            return resolve.get(x, "class")
        if tag == "$function":
            return resolve.get(x, "function")
        if tag == "$enum" and isinstance(x, list) and len(x) == 2:
            cls = resolve.get(x[0], "enum")
            if cls is not None and x[1] not in cls.__members__:
                raise ModelLoadError(f"checkpoint names {x[0]}.{str(x[1])[:40]}, which is not a member of {x[0]}")
            return cls[x[1]] if cls is not None else None
        if tag == "$partial" and isinstance(x, list) and len(x) == 3:
            fn, args, kw = (decode_attr(e, resolve) for e in x)
            if not isinstance(args, list) or not isinstance(kw, dict):
                raise ModelLoadError("checkpoint holds a malformed functools.partial")
            return functools.partial(fn, *args, **kw) if fn is not None else None
    return codec.decode_value(v)


# -- example inputs ---------------------------------------------------------------------------------
def inputs_to_data(inputs) -> list[dict] | None:
    """Shapes and dtypes of top-level tensor inputs (``None`` when there are none or others)."""
    if inputs is None:
        return None
    inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        return None
    return [{"shape": [int(s) for s in x.shape], "dtype": str(x.dtype).removeprefix("torch.")} for x in inputs]


def data_to_inputs(data: list[dict]) -> tuple[torch.Tensor, ...]:
    """The check inputs: normal noise from a fixed seed for floating dtypes, zeros otherwise."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for d in data:
        dtype = codec.decode_value({"$dtype": d["dtype"]})
        shape = [int(s) for s in d["shape"]]
        if len(shape) > 8 or any(s < 0 for s in shape) or torch.Size(shape).numel() > 1 << 26:
            raise ModelLoadError("checkpoint example input shape is malformed")
        out.append(torch.randn(shape, generator=gen).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype))
    return tuple(out)


# -- the tree ----------------------------------------------------------------------------------------
def _entry(path: str, mod: nn.Module, key_of, unstorable: list[str]) -> dict:
    prefix = f"{path}." if path else ""
    where = path or "the root module"
    name = allow.object_name(type(mod))
    if name is None:
        unstorable.append(f"the class of {where} ({type(mod).__qualname__}) has no importable name")
    entry = {"path": path, "class": name, "training": bool(mod.training), "children": list(mod._modules),
             "attrs": {}, "tensor_attrs": {}, "params": {}, "buffers": {}}
    hooks = [k for k in _HOOKS if getattr(mod, k, None)]
    if hooks:
        unstorable.append(f"{where} has hooks ({', '.join(sorted(hooks))})")
    for k, v in vars(mod).items():
        if k in _INTERNALS or k in _DERIVED or (k == "save_pretrained" and _is_save_guard(v)):
            continue  # surgery's save_pretrained guard of an HF model: set again from its config on load
        try:
            if type(v) is torch.Tensor:
                entry["tensor_attrs"][k] = key_of(v, prefix + k)
            else:
                entry["attrs"][k] = encode_attr(v)
        except (_NotStorable, SurgeryError) as exc:
            unstorable.append(f"attribute {prefix + k} ({exc})")
    for k, v in mod._parameters.items():
        if v is not None and type(v) is not nn.Parameter:
            unstorable.append(f"parameter {prefix + k} (a {type(v).__name__})")
        else:
            entry["params"][k] = [key_of(v, prefix + k), v.requires_grad] if v is not None else None
    for k, v in mod._buffers.items():
        if v is not None and type(v) is not torch.Tensor:
            unstorable.append(f"buffer {prefix + k} (a {type(v).__name__})")
        else:
            entry["buffers"][k] = [key_of(v, prefix + k) if v is not None else None, k not in mod._non_persistent_buffers_set]
    return entry


def tree_to_data(model: nn.Module, key_of: Callable[[torch.Tensor, str], str], inputs) -> dict:
    """Describe ``model``'s whole module tree; ``key_of(tensor, suggested_key)`` stores a tensor and
    returns its key; ``inputs`` are the example inputs whose shapes the load check uses."""
    out, seen, unstorable = [], {}, []
    for path, mod in model.named_modules(remove_duplicate=False):
        if id(mod) in seen:
            out.append({"path": path, "alias": seen[id(mod)]})
            continue
        seen[id(mod)] = path
        out.append(_entry(path, mod, key_of, unstorable))
    return {"modules": out, "inputs": inputs_to_data(inputs), "unstorable": unstorable}


def _new(entry: dict, resolve: _Resolver) -> nn.Module | None:
    cls = resolve.get(entry["class"], "module")
    if cls is None:
        return None
    mod = cls.__new__(cls)
    nn.Module.__init__(mod)
    for k in entry["children"]:
        if not isinstance(k, str):
            raise ModelLoadError("checkpoint module tree is malformed")
        mod._modules[k] = None  # the stored order; children are filled in as they are built
    for k, v in entry["attrs"].items():
        if not isinstance(k, str) or k.startswith("__") or k in _INTERNALS or k in _DERIVED:
            raise ModelLoadError(f"checkpoint sets forbidden attribute {k!r} on a {entry['class']} module")
        mod.__dict__[k] = decode_attr(v, resolve)
    return mod


def data_to_tree(data: dict, tensors: dict[str, torch.Tensor], trust: bool = False) -> tuple[nn.Module | None, str]:
    """``(rebuilt model, "")``, or ``(None, why not)`` when a class or function cannot be resolved or
    something was not storable; raises :class:`ModelLoadError` for a malformed tree."""
    if data.get("unstorable"):
        return None, f"not stored: {'; '.join(map(str, data['unstorable'][:3]))}"
    resolve = _Resolver(trust)
    by_path: dict[str, nn.Module] = {}
    params: dict[str, nn.Parameter] = {}
    try:
        for e in data["modules"]:
            path = e["path"]
            parent, _, name = path.rpartition(".")
            if path in by_path or (path and (parent not in by_path or name not in by_path[parent]._modules)):
                raise ModelLoadError(f"checkpoint module tree is malformed at {path!r}")
            if "alias" in e:
                mod = by_path[e["alias"]]
            else:
                mod = _new(e, resolve)
                if mod is None:
                    return None, resolve.why
                codec.restore_state(mod, e, tensors, params)
            if path:
                by_path[parent]._modules[name] = mod
            by_path[path] = mod
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"checkpoint module tree is malformed: {type(exc).__name__}: {exc}") from None
    if resolve.why:
        return None, resolve.why
    if "" not in by_path:
        raise ModelLoadError("checkpoint module tree has no root module")
    root = by_path[""]
    if getattr(getattr(root, "config", None), "surgery_cannot_save", None):
        from .hf.config import guard_save

        guard_save(root)
    return root, ""
