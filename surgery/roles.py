"""Roles of a group's members: which layers *produce* its channels and which *contract* over them.

A group lists every parameter slice removed with its channels, but methods and the fold need to know
what each slice does:

* a **producer** is a conv / linear / embedding whose output channels are the group's channels (a
  filter, with its bias); Li et al.'s L1 scores a channel by its producers' filters;
* a **consumer** is a conv (``groups == 1``) or linear that sums over the group's channels as its
  input dim; ThiNet reconstructs consumers' outputs and a fold rewrites their input slices;
* a **norm** is a BatchNorm-like affine weight on the channel (network slimming's gate).

Both front ends are read: ``call_module`` nodes of ``torch.nn`` layers (fx) and the aten
``conv*/linear/convolution`` calls with ``get_attr`` weights (``torch.export``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx
from torch import nn

from .dependency_graph import DependencyGraph, Group, Member

__all__ = ["Site", "sites", "consumers", "producers", "norm_members", "observation_units"]

aten = torch.ops.aten
_ATEN_CONV = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class Site:
    """One conv or linear call: the tensor it reads, its weight, and its geometry."""

    node: str  # fx node of the call
    input: str  # fx node of the activation it reads
    kind: str  # "conv", "linear", "linearT" (``addmm``: weight (in, out), GPT-2's Conv1D), "convT" / "embedding"
    owner: str  # module owning the weight ("" for the root)
    weight: str  # parameter name on ``owner``
    bias: str | None
    stride: tuple = ()
    padding: tuple = ()  # () for a conv whose padding is not explicit zeros ('same', reflect, ...)
    dilation: tuple = ()
    groups: int = 1

    @property
    def in_dim(self) -> int:
        """The weight dim that contracts over input channels (-1 when the op does not contract)."""
        if self.kind in ("conv", "linear"):
            return 1 if self.groups == 1 else -1
        if self.kind in ("convT", "linearT"):
            return 0 if self.groups == 1 else -1
        return -1

    @property
    def out_dim(self) -> int:
        return {"conv": 0, "linear": 0, "linearT": 1, "convT": 1, "embedding": 1}[self.kind]


def _split(target: str) -> tuple[str, str]:
    owner, _, name = target.rpartition(".")
    return owner, name


def _tuple(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n


def _module_site(node: torch.fx.Node, m: nn.Module) -> Site | None:
    x = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(x, torch.fx.Node):
        return None
    bias = "bias" if getattr(m, "bias", None) is not None else None
    if isinstance(m, nn.modules.conv._ConvNd):
        n = len(m.kernel_size)
        # 'same' padding or a non-zero padding mode: no explicit zero padding (``padding == ()``)
        pad = () if isinstance(m.padding, str) or m.padding_mode != "zeros" else _tuple(m.padding, n)
        return Site(node.name, x.name, "convT" if m.transposed else "conv", node.target, "weight", bias,
                    _tuple(m.stride, n), pad, _tuple(m.dilation, n), m.groups)
    if isinstance(m, nn.Linear):
        return Site(node.name, x.name, "linear", node.target, "weight", bias)
    if isinstance(m, nn.Embedding):
        return Site(node.name, x.name, "embedding", node.target, "weight", None)
    return None


def _addmm_site(node: torch.fx.Node) -> Site | None:
    """``addmm(bias, x, w)`` with a ``get_attr`` weight of shape (in, out) (GPT-2's ``Conv1D``)."""
    args = node.args
    if len(args) < 3 or not all(isinstance(a, torch.fx.Node) for a in args[:3]) or args[2].op != "get_attr":
        return None
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    bias = _split(args[0].target)[1] if args[0].op == "get_attr" else None
    owner, weight = _split(args[2].target)
    return Site(node.name, args[1].name, "linearT", owner, weight, bias)


def _aten_site(node: torch.fx.Node) -> Site | None:
    args = node.args
    if node.target in (torch.addmm, aten.addmm.default):
        return _addmm_site(node)
    if node.target is aten.linear.default:
        kind, n = "linear", 0
    elif node.target in _ATEN_CONV:
        kind, n = "conv", _ATEN_CONV[node.target]
    else:
        return None
    if len(args) < 2 or not all(isinstance(a, torch.fx.Node) for a in args[:2]) or args[1].op != "get_attr":
        return None
    bias = args[2] if len(args) > 2 else None
    bias_name = _split(bias.target)[1] if isinstance(bias, torch.fx.Node) and bias.op == "get_attr" else None
    owner, weight = _split(args[1].target)
    if kind == "linear":
        return Site(node.name, args[0].name, kind, owner, weight, bias_name)
    stride = _tuple(args[3] if len(args) > 3 else 1, n)
    padding = args[4] if len(args) > 4 else 0
    dilation = _tuple(args[5] if len(args) > 5 else 1, n)
    groups = int(args[6]) if len(args) > 6 else 1
    return Site(node.name, args[0].name, kind, owner, weight, bias_name, stride,
                () if isinstance(padding, str) else _tuple(padding, n), dilation, groups)


def sites(graph: DependencyGraph) -> tuple[Site, ...]:
    """Every conv / linear / embedding call of the traced model (computed once per graph)."""
    cached = graph.__dict__.get("_role_sites")
    if cached is not None:
        return cached
    out = []
    for node in graph.fx_graph.nodes:
        site = None
        if node.op == "call_module":
            site = _module_site(node, graph.root.get_submodule(node.target))
        elif node.op == "call_function":
            site = _aten_site(node)
        if site is not None:
            out.append(site)
    graph.__dict__["_role_sites"] = tuple(out)
    return graph.__dict__["_role_sites"]


def _member_index(group: Group) -> dict[tuple[str, str, int], Member]:
    return {(m.module, m.param, m.dim): m for m in group.members}


def consumers(graph: DependencyGraph, group: Group) -> list[tuple[Site, Member]]:
    """Convs (``groups == 1``) and linears that contract over ``group``'s channels, with the member
    holding their input slices."""
    index = _member_index(group)
    out = []
    for s in sites(graph):
        if s.in_dim < 0 or s.kind == "convT":
            continue
        m = index.get((s.owner, s.weight, s.in_dim))
        if m is not None:
            out.append((s, m))
    return out


def producers(graph: DependencyGraph, group: Group) -> list[tuple[Site, Member]]:
    """Convs, linears and embeddings whose output channels are ``group``'s channels."""
    index = _member_index(group)
    out, seen = [], set()
    for s in sites(graph):
        key = (s.owner, s.weight, s.out_dim)
        m = index.get(key)
        if m is not None and key not in seen:
            seen.add(key)
            out.append((s, m))
    return out


def norm_members(model: nn.Module, group: Group) -> list[Member]:
    """Affine weights of BatchNorm / GroupNorm / LayerNorm layers on the group's channels."""
    out = []
    for m in group.members:
        if m.param != "weight":
            continue
        try:
            mod = model.get_submodule(m.module) if m.module else model
        except AttributeError:
            continue
        if isinstance(mod, _NORMS):
            out.append(m)
    return out


def observation_units(graph: DependencyGraph, group: Group, node: str, dim: int) -> np.ndarray:
    """For each entry of ``node``'s tensor along ``dim``: the group channel it carries, or -1."""
    value = graph.gm_node(node).meta["val"]
    sid = graph.table.tensor(node, (), dim % value.dim())
    s = graph.table.spaces[sid]
    comps = graph.atom_comp[s.offset : s.offset + s.size]
    cg, cu = graph._comp.comp_group[comps], graph._comp.comp_unit[comps]
    return np.where(cg == group.id, cu, -1)
