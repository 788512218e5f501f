"""Which dim sizes are attention head dims: a head, not a head-dim coordinate, is the unit.

Attention splits a projection ``(B, L, H * head_dim)`` into ``(B, L, H, head_dim)`` (``view(b, s, -1,
head_dim)`` or ``view(b, s, heads, head_dim)``) and merges it back after the attention. A split or
merge maps the channels onto one of the two dims (``common.couple_reshape``); by default the larger,
which is ``head_dim`` in every real model. Pruning along ``head_dim`` would remove the same
coordinate from every head (and change the ``1/sqrt(head_dim)`` scale); pruning along the heads
removes whole heads, and the attention computes the kept heads exactly as before. So reshapes prefer
the heads wherever the other dim has the size of an attention head dim found in the graph:

* the last dim of the query and the value of ``scaled_dot_product_attention``;
* the contracted dim of a matmul whose scores reach a softmax (eager attention, ``q @ k.T``), and
  the last dim of the value that the probabilities are multiplied with (``probs @ v``).

One scan of the graph per build (cached like ``rotary.rotated_sizes``); no per-channel work.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from ..context import BuildCtx
from ..reasons import Reason

__all__ = ["attention_head_sizes", "SDPA_TARGETS"]

SDPA_TARGETS = frozenset(
    t for t in (F.scaled_dot_product_attention, getattr(torch.ops.aten, "scaled_dot_product_attention", None))
    for t in ((t.default,) if hasattr(t, "default") else (t,)) if t is not None
)
_MATMULS = frozenset({"matmul", "bmm", "baddbmm"})
_SOFTMAX = frozenset({"softmax", "_softmax", "log_softmax", "_log_softmax"})
#: ops between the scores and the softmax (scale, soft-capping, mask, casts) or between the
#: probabilities and ``@ v`` (casts, dropout)
_PASS = frozenset({
    "mul", "div", "add", "sub", "tanh", "to", "_to_copy", "type_as", "float", "type", "masked_fill", "where",
    "dropout", "clone", "contiguous", "truediv", "iadd", "imul", "itruediv", "Dropout",
})
_MAX_DEPTH = 8


def _name(node: torch.fx.Node) -> str:
    from .common import op_name  # common imports this module

    if node.op == "call_module":
        return type(node.graph.owning_module.get_submodule(node.target)).__name__ if node.graph.owning_module else ""
    return op_name(node.target)


def _size(value, dim: int) -> int | None:
    if isinstance(value, torch.Tensor) and value.dim() >= 2:
        s = value.shape[dim]
        return s if isinstance(s, int) and s > 1 else None
    return None


def _val(x):
    return x.meta.get("val") if isinstance(x, torch.fx.Node) else None


def _scores_matmul(softmax: torch.fx.Node) -> torch.fx.Node | None:
    """The matmul whose output reaches ``softmax`` through scale/cap/mask/cast ops, or None."""
    todo, depth = [softmax.args[0]] if softmax.args else [], 0
    while todo and depth < _MAX_DEPTH:
        depth += 1
        nxt = []
        for n in todo:
            if not isinstance(n, torch.fx.Node):
                continue
            name = _name(n)
            if name in _MATMULS:
                return n
            if name in _PASS:
                nxt += [a for a in n.all_input_nodes if isinstance(_val(a), torch.Tensor)]
        todo = nxt
    return None


def _probs_matmuls(softmax: torch.fx.Node):
    """Matmuls whose first operand is the probabilities (through casts and dropout)."""
    todo, depth, seen = [softmax], 0, set()
    while todo and depth < _MAX_DEPTH:
        depth += 1
        nxt = []
        for n in todo:
            for user in n.users:
                if user in seen:
                    continue
                seen.add(user)
                name = _name(user)
                if name in _MATMULS and user.args and user.args[-2 if name == "baddbmm" else 0] is n:
                    yield user
                elif name in _PASS:
                    nxt.append(user)
        todo = nxt


def _scan(graph: torch.fx.Graph) -> frozenset[int]:
    sizes: set = set()
    for node in graph.nodes:
        if node.op != "call_function" and node.op != "call_method" and node.op != "call_module":
            continue
        if node.target in SDPA_TARGETS and len(node.args) >= 3:
            sizes.add(_size(_val(node.args[0]), -1))
            sizes.add(_size(_val(node.args[2]), -1))
        elif _name(node) in _SOFTMAX and node.args:
            mm = _scores_matmul(node)
            if mm is not None and len(mm.args) >= 2:
                sizes.add(_size(_val(mm.args[-2]), -1))  # q @ k.T: contracted over head_dim
                for pv in _probs_matmuls(node):
                    sizes.add(_size(_val(pv.args[-1]), -1))
    return frozenset(s for s in sizes if s)


def attention_head_sizes(ctx: BuildCtx) -> frozenset[int]:
    """Head-dim sizes of the attentions in this build's graph (one scan per build)."""
    cache = ctx.table.cache
    if "attention_head_sizes" not in cache:
        cache["attention_head_sizes"] = _scan(ctx.node.graph)
    return cache["attention_head_sizes"]


def gqa_merge(ctx: BuildCtx, spaces: list[int]) -> int | None:
    """With ``trace(gqa="query")``: HF's ``repeat_kv`` merges ``(kv heads, copies)`` into the query
    heads. The merged dim then follows the copies dim (query head ``h * g + c`` is copy ``c``: one unit
    is the same position in every KV group) and the KV-head dim stays. Returns the index of the
    copies dim in ``spaces``, or None (default grouping: the KV head owns its block of query heads)."""
    table = ctx.table
    copies = table.cache.get("gqa_copies", ()) if table.gqa == "query" else ()
    at = [i for i, sid in enumerate(spaces) if sid in copies]
    if not at or not any(table.fed[sid] for i, sid in enumerate(spaces) if i not in at):
        return None
    for i, sid in enumerate(spaces):
        if i != at[0] and table.fed[sid]:
            ctx.stop(sid, Reason.FIXED_DIM, GQA_QUERY_STOP)
    return at[0]


GQA_QUERY_STOP = "gqa='query': the KV heads stay (each KV group loses the same query-head positions)"
