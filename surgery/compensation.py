"""Bias compensation (FLAP): a removed channel is replaced by its mean, folded into its consumers' biases.

A plan's ``GroupPlan.shift`` holds, for each removed channel ``c``, its mean input at the group's
consumers: one value, or one per input column the channel owns (an attention head owns
``head_dim`` columns of the output projection, each with its own mean). Every linear consumer's
bias then gains ``sum_c W[:, cols(c)] @ mean_c``, in both modes, so pruned == masked still holds and
the consumer's output mean over the calibration tokens is unchanged.

A linear without a bias (Llama's ``o_proj`` / ``down_proj``) is given one holding the compensation,
as FLAP's own code does: on the ``GraphModule`` a new parameter (``get_attr``) passed as the
``aten.linear`` call's bias, or the ``nn.Linear`` module's ``bias`` for an fx ``call_module``; on the
module-tree copy ``module.bias = nn.Parameter(...)`` (the user's model is never touched). The new bias
follows the weight's output rows: sliced with them (prune) or zeroed where they are (mask).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx
from torch import nn

from .errors import RewriteError

__all__ = ["NewBias", "why_not", "shift_biases", "bias_values", "install_graph", "install_module"]


@dataclass
class NewBias:
    """A bias the rewrite adds to a linear that had none: its full-width value and the calls to pass it to."""

    owner: str  # module owning the weight
    weight: str  # the weight's name (its output rows are the bias's entries)
    value: torch.Tensor  # (out_features,) float64, before any output row is removed
    dtype: torch.dtype  # the weight's
    nodes: list[str] = field(default_factory=list)  # fx nodes of the linear calls


def owner_module(root: nn.Module, owner: str) -> nn.Module:
    """The module ``owner`` names under ``root`` (``""``: the root itself)."""
    return root.get_submodule(owner) if owner else root


def why_not(graph, site) -> str:
    """Why ``site`` (a consumer, :class:`surgery.roles.Site`) cannot take a compensation ("" when it can)."""
    who = site.owner or "the model"
    if site.kind not in ("linear", "linearT"):
        return f"{who} is a {site.kind}, not a linear (a constant input does not give it a constant output)"
    if site.bias is not None:
        return ""
    if site.kind == "linearT":
        return f"{who} adds a bias that is not a parameter"
    if getattr(owner_module(graph.root, site.owner), "bias", None) is not None:
        return f"{who} has a 'bias' its linear call does not add"
    return ""


def _columns(w: torch.Tensor, kind: str, cols: list[int]) -> torch.Tensor:
    """The weight's input columns ``cols`` as (out, len(cols))."""
    return w[:, cols] if kind == "linear" else w[cols, :].T


def shift_biases(graph, gp, out: dict, added: dict) -> None:
    """Add group ``gp``'s compensation to every consumer's bias: into ``out[(owner, bias)]`` (a
    changed copy of an existing bias, applied like a fold) or ``added[(owner, "bias")]`` (a
    :class:`NewBias` for a linear without one)."""
    from .roles import consumers

    done = set()
    for site, member in consumers(graph, graph.groups[gp.id]):
        if (site.owner, site.weight) in done:
            if site.bias is None and (site.owner, "bias") in added:
                added[(site.owner, "bias")].nodes.append(site.node)  # a module called twice
            continue
        done.add((site.owner, site.weight))
        why = why_not(graph, site)
        if why:
            raise RewriteError(f"cannot compensate group {gp.id} into {site.owner or 'the model'}: {why}")
        lists = member.index_map()
        w = getattr(owner_module(graph.root, site.owner), site.weight).detach()
        delta = torch.zeros(w.shape[site.out_dim], dtype=torch.float64)
        for c, mean in gp.shift:
            cols = sorted(lists[c]) if c < len(lists) else []
            if not cols:
                continue
            block = _columns(w, site.kind, cols).double()
            if isinstance(mean, tuple):
                if len(mean) != len(cols):
                    raise RewriteError(f"cannot compensate group {gp.id} into {site.owner or 'the model'}: channel {c} "
                                       f"has {len(mean)} means for {len(cols)} input columns")
                delta += block @ torch.tensor(mean, dtype=torch.float64)
            else:
                delta += float(mean) * block.sum(1)
        if site.bias is not None:
            key = (site.owner, site.bias)
            base = out.get(key, getattr(owner_module(graph.root, site.owner), site.bias)).detach()
            out[key] = (base.double() + delta).to(base.dtype)
            continue
        key = (site.owner, "bias")
        new = added.setdefault(key, NewBias(site.owner, site.weight, torch.zeros_like(delta), w.dtype))
        new.value = new.value + delta
        new.nodes.append(site.node)


def bias_values(added: dict, per_tensor: dict, mode: str) -> dict[tuple[str, str], torch.Tensor]:
    """``{(owner, "bias"): tensor}``: each new bias with its weight's removed output rows sliced
    away (``prune``) or zeroed (``mask``); ``per_tensor`` is the rewrite's kept masks per tensor."""
    out = {}
    for key, new in added.items():
        t = new.value.to(new.dtype)
        for dim, kept in per_tensor.get((new.owner, new.weight), ()):
            if dim != 0:
                continue
            if mode == "prune":
                t = t[torch.from_numpy(np.flatnonzero(kept))]
            else:
                t[torch.from_numpy(np.flatnonzero(~kept))] = 0.0
        out[key] = t
    return out


def install_graph(gm: torch.fx.GraphModule, added: dict, values: dict) -> None:
    """Give the pruned ``GraphModule`` its new biases: a parameter on the owner module, passed as the
    bias of each ``aten.linear`` call (an fx ``call_module`` ``nn.Linear`` reads its own ``bias``)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for key, new in added.items():
        owner, name = key
        weight = getattr(owner_module(gm, owner), new.weight)
        owner_module(gm, owner).register_parameter(name, nn.Parameter(values[key].clone(), requires_grad=weight.requires_grad))
        for node_name in dict.fromkeys(new.nodes):
            node = nodes[node_name]
            if node.op == "call_module":
                continue
            with gm.graph.inserting_before(node):
                b = gm.graph.get_attr(f"{owner}.{name}" if owner else name)
            b.meta["val"] = torch.empty_like(values[key], device="meta")
            node.args = (*node.args[:2], b)
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}


def install_module(model: nn.Module, values: dict) -> str:
    """Give the module-tree copy ``model`` its new biases (``""``), or say why it cannot."""
    for (owner, name), t in values.items():
        m = owner_module(model, owner)
        if not isinstance(m, nn.Linear) or name != "bias" or m.bias is not None:
            return f"{owner or 'the model'} takes a compensation bias but is not a torch.nn.Linear without one"
        m.bias = nn.Parameter(t.clone(), requires_grad=m.weight.requires_grad)
    return ""
