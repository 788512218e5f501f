"""Keep a plan for a Hugging Face model within what its config class can describe.

The fitter runs after ``round_to`` and has the last word: a width the config needs wins over the
requested multiple (say so when both are asked for).

Fused Mixture-of-Experts weights go through a grouped matmul that reads rows of 16-byte multiples:
the experts' neuron count and the hidden size are kept at multiples of 4 (float32) / 8 (16-bit).

Only widths a config names are pruned: hidden size, attention heads, KV heads, MLP neurons. Any
other prunable group (BERT's pooler, a custom head's layers) is left whole with that reason, so the
result stays a model ``from_pretrained`` can rebuild.

A stock config holds one hidden size and one head count, and some classes tie them together:
BERT, ViT and GPT-2 compute the head size as ``hidden_size / num_attention_heads``; Llama and Gemma2
(explicit ``head_dim``) still require ``hidden_size % num_attention_heads == 0``. The planner picks
the hidden channels by score like any group; when the plan keeps the same number of heads in every
layer and the hidden group is pruned, :func:`fitter` moves the hidden width to the nearest one the
config accepts (tied: exactly heads x head size), the lowest-scored hidden channels going. Then the
pruned model has a stock config and ``save_pretrained`` / ``from_pretrained`` round-trip it.

A plan whose head counts differ between layers, or that prunes heads with the hidden size kept on a
tied config, is left as it is: the module still runs, :func:`~surgery.hf.config.sync_config` says why
a stock config cannot hold it, and :func:`~surgery.hf.save_pruned` keeps it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from .. import policies
from ..policies import nearest_multiple

from .config import (_K, _MLP_IN, _Q, _config_name, _find, _invalid, _meta_model, _out_width, _shapes, _with_widths, blocks,
                     head_dim_of, hidden_tensor, moe_widths)

__all__ = ["HFFit", "fitter"]


def _names(model: nn.Module, tensor, dim: int) -> set[tuple[str, int]]:
    """Every (parameter name, dim) of ``tensor`` (a tied table has two names; the graph uses one)."""
    return {(n, dim) for n, p in model.named_parameters(remove_duplicate=False) if p is tensor}


def _hidden_members(model: nn.Module) -> set[tuple[str, int]]:
    """(parameter name, dim) of the input embedding's hidden channels."""
    found = hidden_tensor(model)
    return _names(model, *found) if found is not None else set()


def _group_of(graph, members: set[tuple[str, int]]) -> int | None:
    for g in graph.groups:
        if any((m.name, m.dim) in members for m in g.members):
            return g.id
    return None


@dataclass
class HFFit:
    """What the planner needs for an HF model: ``fit(groups, scores, removed) -> removed`` and the
    prunable groups a stock config has no width for (``{group id: reason}``), left whole."""

    fit: Callable[[list, dict, dict], dict]
    undescribable: dict[int, str] = field(default_factory=dict)


def _hidden_followers(model, graph, hidden_gid, known, heads, head_dim, tied) -> set[int]:
    """Groups outside the hidden group whose width the config also derives from the hidden size
    (BERT's pooler): found by building the class on the meta device with a smaller hidden size and
    seeing which tensor dims shrink with it."""
    if hidden_gid is None:
        return set()
    size = graph.groups[hidden_gid].size
    candidates = [g for g in graph.groups if g.prunable and g.id not in known and g.size == size]
    if not candidates:
        return set()
    config = model.config
    n = int(getattr(config, _config_name(config, "heads"), 0) or 0) if heads else 0
    if tied and n > 1:
        smaller = {"hidden": (n - 1) * head_dim, "heads": n - 1}
    else:
        smaller = {"hidden": size - max(n, 1)}
    try:
        fresh = _shapes(_meta_model(model, _with_widths(config, smaller)))
    except Exception:  # the class refuses the probe widths: no follower is found
        return set()
    shrunk = {(k, d) for k, shape in _shapes(model).items() for d, w in enumerate(shape)
              if w == size and k in fresh and len(fresh[k]) == len(shape) and fresh[k][d] == smaller["hidden"]}
    params = dict(model.named_parameters(remove_duplicate=False))
    return {g.id for g in candidates
            if all((m.name, m.dim) in shrunk for m in g.members if m.name in params)}


def fitter(model: nn.Module, graph) -> HFFit | None:
    """The :class:`HFFit` for ``model`` (an HF model traced as ``graph``), or None when no group of it
    is a hidden, head or MLP width of a transformer block (then the config is not involved)."""
    config = model.config
    hidden_gid = _group_of(graph, _hidden_members(model))
    head_dim = head_dim_of(config) if _config_name(config, "heads") else 0
    tied = _config_name(config, "head_dim") is None
    heads: dict[int, int] = {}  # head group id -> query heads per channel of the group
    aligned: set[int] = set()  # fused experts' neuron groups: kept widths a multiple of ``align``
    align = 1
    known: set[int] = {hidden_gid} if hidden_gid is not None and _config_name(config, "hidden") else set()
    for name, block in blocks(model):
        for names, kind in ((_Q, "heads"), (_K, "kv_heads"), (_MLP_IN, "intermediate")):
            found = _find(block, names)
            if found is None or _config_name(config, kind) is None:
                continue
            module = found[1]
            gid = _group_of(graph, _names(model, module.weight, 1 if type(module).__name__ == "Conv1D" else 0))
            if gid is None:
                continue
            known.add(gid)
            if kind == "heads" and head_dim:
                n_heads = _out_width(module) // (3 if found[0].endswith("c_attn") else 1) // head_dim
                heads[gid] = max(1, n_heads // graph.groups[gid].size)
        for kind, (tensor, dim) in moe_widths(block).items():  # experts' neurons, a shared expert's
            gid = _group_of(graph, _names(model, tensor, dim))
            if gid is not None and _config_name(config, kind) is not None:
                known.add(gid)
                if kind == "experts_intermediate":  # the grouped-mm kernel reads rows of 16-byte multiples
                    aligned.add(gid)
                    align = max(align, 16 // tensor.element_size())
    if not known:
        return None
    followers = _hidden_followers(model, graph, hidden_gid, known, heads, head_dim, tied)
    cls = type(config).__name__
    undescribable = {g.id: f"{cls} has no width for these channels (a stock config could not reload the model)"
                     for g in graph.groups if g.prunable and g.id not in known and g.id not in followers}

    def hidden_kept(chosen, removed) -> int | None:
        """The hidden width the config can describe for ``removed`` (None: leave the plan alone)."""
        size = graph.groups[hidden_gid].size
        keep = size - len(removed.get(hidden_gid, ()))
        if keep == size or not heads:
            return nearest_multiple(keep, size, align)
        kept_heads = {(graph.groups[gid].size - len(removed.get(gid, ())) if gid in chosen else graph.groups[gid].size) * per
                      for gid, per in heads.items()}
        if len(kept_heads) != 1:
            return None  # per-layer head counts: no stock config either way
        h = kept_heads.pop()
        if tied:
            return h * head_dim
        step = math.lcm(h if _invalid(_with_widths(config, {"hidden": keep, "heads": h})) else 1, align)
        want = nearest_multiple(keep, size, step)
        return want if not _invalid(_with_widths(config, {"hidden": want, "heads": h})) else None

    def lowest(scores, gid: int, kept: int) -> np.ndarray:
        return policies.lowest(scores[gid], graph.groups[gid].size - kept)

    def fit(groups, scores: dict, removed: dict) -> dict:
        chosen = {g.id for g in groups}
        out = dict(removed)
        for gid in aligned & chosen:
            if len(removed.get(gid, ())):
                size = graph.groups[gid].size
                out[gid] = lowest(scores, gid, nearest_multiple(size - len(removed[gid]), size, align))
        if hidden_gid not in chosen:
            return {k: v for k, v in out.items() if k not in followers}
        want = hidden_kept(chosen, out)
        if want is None or not 0 < want <= graph.groups[hidden_gid].size:
            return out
        for gid in (hidden_gid, *followers):
            if gid in chosen or gid == hidden_gid:
                out[gid] = lowest(scores, gid, want)
        return out

    return HFFit(fit, undescribable)
