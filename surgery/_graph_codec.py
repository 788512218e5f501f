"""A ``torch.fx.GraphModule`` as plain data (JSON + named tensors) and back, without pickle.

The data has two parts:

``graph``
    ``{"class_name": str, "nodes": [{"op", "name", "target", "args", "kwargs"}, ...]}``, plus
    ``"pytree": {"orig_args": [str], "in_spec": str, "out_spec": str | None}`` for a graph whose inputs
    or outputs are nested (``torch.export``'s pytree code generator; the specs are
    ``torch.utils._pytree.treespec_dumps`` JSON, which names only registered container types). Targets of
    ``call_function`` nodes are qualified names (``torch.flatten``, ``_operator.add``), resolved on
    load against :mod:`surgery._allowlist`. Arguments are JSON with tagged values:
    ``{"$node": name}``, ``{"$tuple": [...]}``, ``{"$slice": [a, b, c]}``, ``{"$dtype": "float32"}``...
``modules``
    One entry per submodule, in ``named_modules`` order: ``{"path", "class", "training", "attrs",
    "params": {name: tensor key | None}, "buffers": {name: [tensor key | None, persistent]},
    "tensor_attrs": {name: tensor key}}``, or ``{"path", "alias": other path}`` for a shared module.
    The root (``path == ""``) has no class: it becomes the ``GraphModule``. A sub-graph (``torch.export``'s
    ``wrap_with_set_grad_enabled`` body, read by ``get_attr``) is an entry with class
    ``torch.fx.graph_module.GraphModule`` and a ``"graph"`` of its own, checked and rebuilt the same way.

Modules are rebuilt with ``cls.__new__(cls)`` + ``nn.Module.__init__`` + attributes: no constructor
and no user code runs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
import torch.fx
from torch import nn

from . import _allowlist as allow
from .errors import ModelLoadError, SurgeryError

__all__ = ["encode_value", "decode_value", "graph_to_data", "data_to_graph", "module_paths", "modules_to_data", "data_to_modules"]

#: Keys every ``nn.Module`` instance has in its ``__dict__``: handled by ``nn.Module.__init__``.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
#: Attributes rebuilt from other state rather than stored (RNN weight lists).
_DERIVED = {"_flat_weights", "_flat_weight_refs"}


# -- values -------------------------------------------------------------------------------------
def encode_value(v, where: str = "value"):
    """JSON-able encoding of a node argument or a module attribute (tensors are not accepted)."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v) if math.isfinite(v) else {"$float": repr(float(v))}
    if isinstance(v, torch.fx.Node):
        return {"$node": v.name}
    if isinstance(v, torch.Size):
        return {"$size": [int(s) for s in v]}
    if isinstance(v, tuple) and not hasattr(v, "_fields"):
        return {"$tuple": [encode_value(x, where) for x in v]}
    if isinstance(v, list):
        return [encode_value(x, where) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"$dict": {k: encode_value(x, where) for k, x in v.items()}}
    if isinstance(v, slice):
        return {"$slice": [encode_value(v.start, where), encode_value(v.stop, where), encode_value(v.step, where)]}
    if v is Ellipsis:
        return {"$ellipsis": True}
    for tag, kind in (("$dtype", torch.dtype), ("$memory_format", torch.memory_format), ("$layout", torch.layout)):
        if isinstance(v, kind):
            return {tag: str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"$device": str(v)}
    raise SurgeryError(f"cannot store {where}: values of type {type(v).__name__} are not supported in a dense checkpoint")


def decode_value(v, nodes: dict[str, torch.fx.Node] | None = None):
    """Inverse of :func:`encode_value`; ``nodes`` maps node names for ``$node`` references."""
    if v is None or isinstance(v, (bool, str, int, float)):
        return v
    if isinstance(v, list):
        return [decode_value(x, nodes) for x in v]
    if not isinstance(v, dict) or len(v) != 1:
        raise ModelLoadError(f"unexpected value in checkpoint graph: {str(v)[:60]}")
    (tag, x), = v.items()
    if tag == "$node":
        if nodes is None or x not in nodes:
            raise ModelLoadError(f"checkpoint graph refers to unknown node {x!r}")
        return nodes[x]
    if tag == "$tuple":
        return tuple(decode_value(e, nodes) for e in x)
    if tag == "$size":
        return torch.Size([int(e) for e in x])
    if tag == "$dict":
        return {str(k): decode_value(e, nodes) for k, e in x.items()}
    if tag == "$slice":
        return slice(*(decode_value(e, nodes) for e in x))
    if tag == "$ellipsis":
        return Ellipsis
    if tag == "$float" and x in ("inf", "-inf", "nan"):
        return float(x)
    if tag == "$device":
        return torch.device(x)
    kinds = {"$dtype": torch.dtype, "$memory_format": torch.memory_format, "$layout": torch.layout}
    if tag in kinds and isinstance(x, str) and not x.startswith("_") and isinstance(getattr(torch, x, None), kinds[tag]):
        return getattr(torch, x)
    raise ModelLoadError(f"unexpected value in checkpoint graph: {tag}")


# -- graph --------------------------------------------------------------------------------------
def graph_to_data(gm: torch.fx.GraphModule) -> dict:
    """The nodes of ``gm.graph`` as plain data (raises ``SurgeryError`` for what cannot be stored)."""
    codegen = gm.graph._codegen
    if type(codegen) not in (torch.fx.graph.CodeGen, torch.fx.graph._PyTreeCodeGen):
        raise SurgeryError(f"cannot store a graph with a custom code generator ({type(codegen).__name__}) in a dense checkpoint")
    nodes = []
    for n in gm.graph.nodes:
        target = n.target
        if n.op == "call_function":
            try:
                target = allow.function_name(n.target)
            except ValueError as exc:
                raise SurgeryError(f"cannot store node {n.name}: {exc}") from None
        elif n.op == "call_method" and not allow._method_ok(n.target):
            raise SurgeryError(f"cannot store node {n.name}: method {n.target!r} is not on the checkpoint allow-list")
        where = f"an argument of node {n.name}"
        nodes.append({"op": n.op, "name": n.name, "target": target,
                      "args": encode_value(tuple(n.args), where), "kwargs": encode_value(dict(n.kwargs), where)})
    data = {"class_name": type(gm).__name__, "nodes": nodes}
    if type(codegen) is torch.fx.graph._PyTreeCodeGen:
        data["pytree"] = _pytree_to_data(codegen.pytree_info)
    return data


def _pytree_to_data(info) -> dict:
    import torch.utils._pytree as pytree

    try:
        return {"orig_args": [str(a) for a in info.orig_args], "in_spec": pytree.treespec_dumps(info.in_spec),
                "out_spec": pytree.treespec_dumps(info.out_spec) if info.out_spec is not None else None}
    except Exception as exc:  # e.g. a namedtuple without a registered serialized name
        raise SurgeryError(f"cannot store the model's input/output structure: {str(exc).splitlines()[0]}") from None


def _names_ok(names) -> bool:
    import keyword

    return all(isinstance(n, str) and n.isidentifier() and not keyword.iskeyword(n) for n in names)


def _attr_ok(name) -> bool:
    """A module, parameter or buffer name fx may write into generated code: an identifier, or the
    digits of a ``ModuleList`` / ``ParameterList`` index (fx spells those ``getattr(self, "0")``,
    unescaped, so anything else could inject code)."""
    return isinstance(name, str) and (_names_ok([name]) or name.isdigit())


def _path_ok(path) -> bool:
    return isinstance(path, str) and all(_attr_ok(p) for p in path.split("."))


def _data_to_codegen(data) -> torch.fx.graph.CodeGen:
    """The pytree code generator stored by :func:`_pytree_to_data`. Its argument names and keyword
    names go into generated source, so they must be identifiers."""
    import torch.utils._pytree as pytree

    if not isinstance(data, dict) or not isinstance(data.get("orig_args"), list) or not _names_ok(data["orig_args"]):
        raise ModelLoadError("checkpoint input/output structure is malformed")
    try:
        in_spec = pytree.treespec_loads(data["in_spec"])
        out_spec = pytree.treespec_loads(data["out_spec"]) if data.get("out_spec") is not None else None
    except Exception as exc:
        raise ModelLoadError(f"checkpoint input/output structure cannot be read ({str(exc).splitlines()[0]})") from None
    if in_spec.type is tuple and in_spec.num_children == 2 and in_spec.child(1).type is dict:
        if not _names_ok(in_spec.child(1).context):
            raise ModelLoadError("checkpoint input structure has keyword names that are not identifiers")
    return torch.fx.graph._PyTreeCodeGen(torch.fx.graph._PyTreeInfo(list(data["orig_args"]), in_spec, out_spec))


def _check_node(op: str, target, args, kwargs, tensor_targets: set[str], module_paths: set[str], graph_paths: set[str]):
    if not _names_ok(kwargs):  # keyword names are written into the generated code as they are
        raise ModelLoadError("checkpoint graph has a keyword argument name that is not an identifier")
    if op == "placeholder" and not (isinstance(target, str) and _names_ok([target.lstrip("*")]) and len(target) - len(target.lstrip("*")) <= 2):
        raise ModelLoadError(f"checkpoint graph has an input named {str(target)[:80]!r}, which is not an identifier")
    if op in ("get_attr", "call_module") and not _path_ok(target):
        raise ModelLoadError(f"checkpoint graph names {str(target)[:80]!r}, which is not an attribute path")
    if op == "call_function":
        fn = allow.resolve_function(target)
        if fn is _WRAP_GRAD:  # runs a stored sub-graph, and nothing else, under no_grad / enable_grad
            body = args[1] if len(args) >= 2 else None
            if not isinstance(args[0], bool) or not (isinstance(body, torch.fx.Node) and body.op == "get_attr"
                                                     and body.target in graph_paths):
                raise ModelLoadError("checkpoint graph calls wrap_with_set_grad_enabled without a stored sub-graph")
        if fn is getattr:
            if len(args) < 2:
                raise ModelLoadError("checkpoint graph has a malformed getattr call")
            allow.check_getattr(args[1])
        return fn
    if op == "call_method":
        return allow.check_method(target)
    if op == "call_module" and target not in module_paths:
        raise ModelLoadError(f"checkpoint graph calls unknown module {target!r}")
    if op == "get_attr" and target not in tensor_targets and target not in graph_paths:
        raise ModelLoadError(f"checkpoint graph reads {target!r}, which is not a stored tensor or sub-graph")
    if op not in ("placeholder", "output", "call_module", "get_attr"):
        raise ModelLoadError(f"checkpoint graph has a node of unknown kind {op!r}")
    if not isinstance(target, str):
        raise ModelLoadError("checkpoint graph has a malformed node target")
    return target


def data_to_graph(data: dict, tensor_targets: set[str], module_paths: set[str], graph_paths: set[str] = frozenset()) -> torch.fx.Graph:
    """Rebuild a ``torch.fx.Graph`` from :func:`graph_to_data` output, checking every target.

    ``graph_paths``: the modules that are stored sub-graphs (the only modules ``get_attr`` may read)."""
    graph = torch.fx.Graph()
    made: dict[str, torch.fx.Node] = {}
    try:
        for nd in data["nodes"]:
            args = decode_value(nd["args"], made)
            kwargs = decode_value(nd["kwargs"], made)
            if not isinstance(args, tuple) or not isinstance(kwargs, dict):
                raise ModelLoadError(f"checkpoint node {nd['name']!r} is malformed")
            target = _check_node(nd["op"], nd["target"], args, kwargs, tensor_targets, module_paths, graph_paths)
            made[nd["name"]] = graph.create_node(nd["op"], target, args, kwargs, name=nd["name"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"checkpoint graph is malformed: {type(exc).__name__}: {exc}") from None
    if data.get("pytree") is not None:
        graph.set_codegen(_data_to_codegen(data["pytree"]))
    graph.lint()
    return graph


# -- modules ------------------------------------------------------------------------------------
def modules_to_data(root: nn.Module, key_of: Callable[[torch.Tensor, str], str]) -> list[dict]:
    """Describe every submodule; ``key_of(tensor, suggested_key)`` stores a tensor and returns its key."""
    out, seen = [], {}
    for path, mod in root.named_modules(remove_duplicate=False):
        if id(mod) in seen:
            out.append({"path": path, "alias": seen[id(mod)]})
            continue
        seen[id(mod)] = path
        bad = next((n for n in (path.split(".") if path else []) + [*mod._parameters, *mod._buffers] if not _attr_ok(n)), None)
        if bad is not None:  # the loader refuses such names: fx would write them into code unescaped
            raise SurgeryError(f"cannot store module {path!r} in a dense checkpoint: the name {bad!r} is not an identifier")
        prefix = f"{path}." if path else ""
        entry: dict = {"path": path, "training": mod.training, "attrs": {}, "tensor_attrs": {}}
        if path and isinstance(mod, torch.fx.GraphModule):  # an export sub-graph: its nodes, not its attributes
            entry["class"], entry["graph"] = _SUBGRAPH, graph_to_data(mod)
            for k, v in vars(mod).items():
                if isinstance(v, torch.Tensor) and k not in _MODULE_INTERNALS:
                    entry["tensor_attrs"][k] = key_of(v, prefix + k)
        elif path:
            if not allow.module_class_allowed(type(mod)):
                raise SurgeryError(
                    f"cannot store module {path!r} of class {allow.qualified_name(type(mod))} in a dense checkpoint: "
                    f"only torch.nn and torchvision.ops module classes can be rebuilt without their source"
                )
            entry["class"] = allow.qualified_name(type(mod))
            for k, v in vars(mod).items():
                if k in _MODULE_INTERNALS or k in _DERIVED:
                    continue
                if isinstance(v, torch.Tensor):
                    entry["tensor_attrs"][k] = key_of(v, prefix + k)
                else:
                    entry["attrs"][k] = encode_value(v, f"attribute {k!r} of module {path!r}")
        else:
            for k, v in vars(mod).items():  # GraphModule constants that get_attr reads
                if isinstance(v, torch.Tensor) and k not in _MODULE_INTERNALS:
                    entry["tensor_attrs"][k] = key_of(v, k)
        entry["params"] = {
            k: [key_of(v, prefix + k), v.requires_grad] if v is not None else None for k, v in mod._parameters.items()
        }
        entry["buffers"] = {
            k: [key_of(v, prefix + k) if v is not None else None, k not in mod._non_persistent_buffers_set]
            for k, v in mod._buffers.items()
        }
        out.append(entry)
    return out


_SUBGRAPH = "torch.fx.graph_module.GraphModule"


def module_paths(root: nn.Module) -> tuple[set[str], set[str]]:
    """The submodule paths of ``root`` (what ``call_module`` may call) and those that are stored
    sub-graphs (what ``get_attr`` may read as a module), for :func:`data_to_graph`."""
    paths, graphs = set(), set()
    for p, m in root.named_modules(remove_duplicate=False):
        if p:
            paths.add(p)
            if isinstance(m, torch.fx.GraphModule):
                graphs.add(p)
    return paths, graphs

_WRAP_GRAD = getattr(getattr(torch.ops, "higher_order", None), "wrap_with_set_grad_enabled", None)


def _new_module(cls_name: str, attrs: dict) -> nn.Module:
    cls = allow.resolve_module_class(cls_name) if cls_name != "torch.nn.modules.module.Module" else nn.Module
    if cls is None:
        raise ModelLoadError(f"checkpoint names module class {cls_name!r}, which is not on the allow-list")
    mod = cls.__new__(cls)
    nn.Module.__init__(mod)
    for k, v in attrs.items():
        if not isinstance(k, str) or k.startswith("__") or k in _MODULE_INTERNALS or k in _DERIVED:
            raise ModelLoadError(f"checkpoint sets forbidden attribute {k!r} on a {cls_name} module")
        mod.__dict__[k] = decode_value(v)
    return mod


def restore_state(mod: nn.Module, entry: dict, tensors: dict, params: dict) -> None:
    """Give ``mod`` an entry's training flag, parameters (one ``nn.Parameter`` per stored key, shared
    through ``params``), buffers and tensor attributes; raises :class:`ModelLoadError` for a missing
    tensor or a forbidden attribute name."""

    def tensor(key):
        if key not in tensors:
            raise ModelLoadError(f"checkpoint lacks tensor {key!r}")
        return tensors[key]

    names = [*entry["params"], *entry["buffers"], *entry["tensor_attrs"]]
    if not all(_attr_ok(k) for k in names):
        raise ModelLoadError(f"checkpoint names a tensor {next(str(k)[:80] for k in names if not _attr_ok(k))!r}, which is not an attribute name")
    mod.training = bool(entry["training"])
    for k, spec in entry["params"].items():
        if spec is not None and spec[0] not in params:
            t = tensor(spec[0])
            params[spec[0]] = nn.Parameter(t, requires_grad=bool(spec[1]) and (t.is_floating_point() or t.is_complex()))
        mod.register_parameter(k, params[spec[0]] if spec is not None else None)
    for k, (key, persistent) in entry["buffers"].items():
        mod.register_buffer(k, tensor(key) if key is not None else None, persistent=bool(persistent))
    for k, key in entry["tensor_attrs"].items():
        if not isinstance(k, str) or k.startswith("__") or k in _MODULE_INTERNALS:
            raise ModelLoadError(f"checkpoint sets forbidden attribute {k!r}")
        mod.__dict__[k] = tensor(key)
    if isinstance(mod, nn.RNNBase):
        mod._init_flat_weights()


def data_to_modules(entries: list[dict], tensors: dict[str, torch.Tensor]) -> tuple[nn.Module, set[str]]:
    """Rebuild the module tree; returns the root and the dotted names of every stored tensor."""
    by_path: dict[str, nn.Module] = {}
    tensor_names: set[str] = set()
    params: dict[str, nn.Parameter] = {}
    graphs: list[tuple[str, dict]] = []
    aliases: list[tuple[str, str]] = []
    try:
        for e in entries:
            path = e["path"]
            if path and not _path_ok(path):
                raise ModelLoadError(f"checkpoint module path {str(path)[:80]!r} is not an attribute path")
            if path in by_path or (path and path.rpartition(".")[0] not in by_path):
                raise ModelLoadError(f"checkpoint module tree is malformed at {path!r}")
            if "alias" in e:
                mod = by_path[e["alias"]]
                aliases.append((path, e["alias"]))
            elif path and e.get("class") == _SUBGRAPH:
                mod = nn.Module()  # becomes a GraphModule once its own submodules exist (below)
                graphs.append((path, e.get("graph")))
            elif path:
                mod = _new_module(e["class"], e["attrs"])
            else:
                mod = nn.Module()
            if "alias" not in e:
                restore_state(mod, e, tensors, params)
            if path:
                parent, _, name = path.rpartition(".")
                by_path[parent]._modules[name] = mod
            by_path[path] = mod
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"checkpoint module tree is malformed: {type(exc).__name__}: {exc}") from None
    if "" not in by_path:
        raise ModelLoadError("checkpoint has no root module")
    for path, data in sorted(graphs, key=lambda pg: -pg[0].count(".")):  # innermost first
        if path not in by_path or not isinstance(data, dict):
            raise ModelLoadError(f"checkpoint sub-graph {path!r} is malformed")
        holder = by_path[path]
        names = {k for k, v in (*holder._parameters.items(), *holder._buffers.items(), *vars(holder).items())
                 if isinstance(v, torch.Tensor)}
        sub = torch.fx.GraphModule(holder, data_to_graph(data, names, *module_paths(holder)))
        for at in [path] + [a for a, target in aliases if target == path]:
            parent, _, name = at.rpartition(".")
            by_path[parent]._modules[name] = by_path[at] = sub
    root = by_path[""]
    for path, mod in root.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        tensor_names |= {prefix + k for k, v in (*mod._parameters.items(), *mod._buffers.items(), *vars(mod).items())
                         if isinstance(v, torch.Tensor)}
    return root, tensor_names
