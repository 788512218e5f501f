"""Transformer ops: scaled dot-product attention (masks, GQA), ``addmm`` (GPT-2's ``Conv1D``) and the
higher-order sub-graphs that ``torch.export`` wraps around rotary tables (``wrap_with_set_grad_enabled``,
``wrap_with_autocast``).

Attention is pruned by whole heads (``heads.py`` makes the head the unit of the split/merge reshapes):
a removed head takes its query, key and value rows and its columns of the output projection, and the
kept heads compute exactly what they computed before. Under grouped-query attention a KV head serves
the contiguous block of ``g = Hq / Hkv`` query heads ``h*g .. h*g+g-1`` (``enable_gqa=True``, or
HF's ``repeat_kv``: ``expand`` + ``reshape``, explained by those rules), so query head ``i`` goes
with KV head ``i // g`` and the group has one unit per KV head.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..context import BuildCtx
from ..reasons import Reason
from ._registry import aten_ops, function_rule, lookup
from .heads import GQA_QUERY_STOP

__all__ = ["sdpa", "addmm", "higher_order_subgraph"]





# -- scaled dot-product attention ----------------------------------------------------------------


def _couple_heads(ctx: BuildCtx, t, out, gqa: bool) -> None:
    """Leading (batch, head) dims of ``t`` with the output's: equal sizes pass through; under
    ``enable_gqa`` the key/value head dim (dim -3) owns a block of query heads."""
    shape, oshape = ctx.shape(t), out.shape
    off = len(oshape) - len(shape)
    for d in range(len(shape) - 2):
        o = off + d
        if o < 0:
            continue
        if shape[d] == oshape[o]:
            ctx.identity(ctx.sp(t, d), ctx.out(o))
        elif gqa and d == len(shape) - 3 and shape[d] > 1 and oshape[o] % shape[d] == 0:
            if ctx.table.gqa == "query":  # query head h * g + c goes with c of every group; KV heads stay
                ctx.table.tie_period(ctx.out(o), oshape[o] // shape[d])
                ctx.stop(ctx.sp(t, d), Reason.FIXED_DIM, GQA_QUERY_STOP)
            else:
                ctx.table.block(ctx.sp(t, d), ctx.out(o))


def _couple_mask(ctx: BuildCtx, mask, k) -> None:
    """The mask / additive bias broadcasts over ``(..., heads, L, S)``: its dims couple with the
    output's batch and head dims, with L (queries) and with S (keys); never with ``head_dim``."""
    out = ctx.out_val()
    m = ctx.shape(mask)
    off = out.dim() - len(m)
    if off < 0:
        return
    for d, size in enumerate(m):
        o = off + d
        if o == out.dim() - 1:
            target = ctx.sp(k, -2)
            tsize = ctx.shape(k)[-2]
        else:
            target, tsize = ctx.out(o), out.shape[o]
        if size == tsize and size != 1:
            ctx.identity(ctx.sp(mask, d), target)


@function_rule(F.scaled_dot_product_attention, *aten_ops("scaled_dot_product_attention"))
def sdpa(ctx: BuildCtx) -> None:
    """``sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)`` on ``(..., H, L, E)``.

    q and k share ``E`` (contracted), k and v share ``S``; the output has q's ``L`` and v's ``Ev``.
    The heads (and batch) pass through; a float or bool ``attn_mask`` couples with the heads (when it
    has a head dim, as T5's or BEiT's position bias does) and the score dims only. Without an explicit
    ``scale`` the head dim is cross-channel (the scale is ``1/sqrt(E)``); heads are the unit anyway.
    """
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    if not all(ctx.is_tensor(t) for t in (q, k, v)):
        return
    out = ctx.out_val()
    if not isinstance(out, torch.Tensor) or min(ctx.val(t).dim() for t in (q, k, v)) < 2:
        return
    ctx.identity(ctx.sp(q, -1), ctx.sp(k, -1))
    ctx.identity(ctx.sp(k, -2), ctx.sp(v, -2))
    ctx.identity(ctx.sp(q, -2), ctx.out(-2))
    ctx.identity(ctx.sp(v, -1), ctx.out(-1))
    if ctx.arg(6, "scale", None) is None:
        ctx.cross(ctx.sp(q, -1), "attention scale 1/sqrt(head dim)")
    gqa = bool(ctx.arg(7, "enable_gqa", False))
    for t in (q, k, v):
        _couple_heads(ctx, t, out, gqa and t is not q)
    mask = ctx.arg(3, "attn_mask", None)
    if ctx.is_tensor(mask):
        _couple_mask(ctx, mask, k)


# -- addmm (GPT-2's Conv1D) ------------------------------------------------------------------------


@function_rule(torch.addmm, *aten_ops("addmm"))
def addmm(ctx: BuildCtx) -> None:
    """``addmm(bias, x, w) = bias + x @ w`` with ``w`` of shape ``(in, out)`` (GPT-2's ``Conv1D``):
    ``x``'s columns go with ``w``'s rows, ``w``'s columns with the output's and the bias's."""
    bias, x, w = ctx.arg(0, "input"), ctx.arg(1, "mat1"), ctx.arg(2, "mat2")
    if not (ctx.is_tensor(x) and ctx.is_tensor(w)) or ctx.val(x).dim() != 2 or ctx.val(w).dim() != 2:
        return
    ctx.identity(ctx.sp(x, 1), ctx.sp(w, 0))
    ctx.identity(ctx.sp(x, 0), ctx.out(0))
    ctx.identity(ctx.sp(w, 1), ctx.out(1))
    if ctx.is_tensor(bias):
        b = ctx.shape(bias)
        out = ctx.out_val().shape
        for d, size in enumerate(b):
            o = 2 - len(b) + d
            if size == out[o]:
                ctx.identity(ctx.sp(bias, d), ctx.out(o))


# -- higher-order sub-graphs ---------------------------------------------------------------------

#: HOP -> (index of the sub-graph argument, index of its first operand)
_HOPS: dict[object, tuple[int, int]] = {}
for _name, _sub in (("wrap_with_set_grad_enabled", 1), ("wrap_with_autocast", 4)):
    _op = getattr(torch.ops.higher_order, _name, None)
    if _op is not None:
        _HOPS[_op] = (_sub, _sub + 1)


def _subgraph_flow(sub: torch.fx.GraphModule, n_in: int) -> tuple[list[list[int]], list, object] | None:
    """Couple the sub-graph's own nodes in a scratch table (its placeholders and outputs open).

    Returns the placeholder spaces, the output spaces (one list per output slot) and the table, or
    None when the sub-graph's values are not all known."""
    from ..coupling import couple_node  # coupling imports the rules
    from ..spaces import SpaceTable

    table = SpaceTable()
    ins: list[list[int]] = []
    outs = None
    for node in sub.graph.nodes:
        if node.op == "placeholder":
            v = node.meta.get("val")
            spaces = [table.tensor(node.name, (), d, v.shape[d]) for d in range(v.dim())] if isinstance(v, torch.Tensor) else []
            table.node_spaces[node.name] = spaces
            ins.append(spaces)
        elif node.op == "output":
            result = node.args[0]
            items = result if isinstance(result, (tuple, list)) else (result,)
            outs = []
            for item in items:
                v = item.meta.get("val") if isinstance(item, torch.fx.Node) else None
                outs.append([table.tensor(item.name, (), d) for d in range(v.dim())] if isinstance(v, torch.Tensor) else [])
        else:
            couple_node(table, sub, node)
    if outs is None or len(ins) != n_in:
        return None
    return ins, outs, table


def _rewritten_components(sub: torch.fx.GraphModule, table, comp: np.ndarray, ncomp: int) -> np.ndarray:
    """Components that pass through an op whose constants the rewrite would recompute (a reshape's
    sizes): the rewrite does not enter sub-graphs, so such dims must not shrink."""
    nodes = {n.name: n for n in sub.graph.nodes}
    flag = np.zeros(ncomp, dtype=bool)
    for s in table.spaces:
        node = nodes.get(s.node)
        if node is not None and node.op in ("call_function", "call_method"):
            rule = lookup(node)
            if rule is not None and rule.rewrite is not None:
                flag[comp[table.atoms(s.id)]] = True
    return flag


@function_rule(*_HOPS)
def higher_order_subgraph(ctx: BuildCtx) -> None:
    """``wrap_with_set_grad_enabled(flag, gm, *args)`` / ``wrap_with_autocast(..., gm, *args)``: the
    sub-graph is entered (its ops coupled by their own rules, in a scratch table); an operand dim that
    reaches an output dim entry for entry, through no stop and no size constant, passes through. Every
    other dim is stopped (the rotary tables: ``inv_freq`` becomes the head dim through ``cat``)."""
    sub_at, first = _HOPS[ctx.node.target]
    holder = ctx.node.args[sub_at] if len(ctx.node.args) > sub_at else None
    root = ctx.node.graph.owning_module
    if not isinstance(holder, torch.fx.Node) or holder.op != "get_attr" or root is None:
        return
    sub = root.get_submodule(holder.target)
    operands = list(ctx.node.args[first:])
    flow = _subgraph_flow(sub, len(operands))
    if flow is None:
        return
    ins, outs, table = flow
    n = table.n_atoms
    a, b = table.edges()
    ncomp, comp = connected_components(coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(n, n)), directed=False)
    stopped = _rewritten_components(sub, table, comp, ncomp)
    for sid in table.stops:
        stopped[comp[table.atoms(sid)]] = True
    result = ctx.out_val()
    for j, out_spaces in enumerate(outs):
        path = (j,) if isinstance(result, (tuple, list)) else ()
        for e, osid in enumerate(out_spaces):
            oc = comp[table.atoms(osid)]
            if stopped[oc].any():
                continue
            for i, x in enumerate(operands):
                if not ctx.is_tensor(x):
                    continue
                for d, isid in enumerate(ins[i]):
                    ic = comp[table.atoms(isid)]
                    if ic.size == oc.size and np.array_equal(ic, oc) and np.unique(ic).size == ic.size:
                        ctx.identity(ctx.sp(x, d), ctx.out(e, path))
