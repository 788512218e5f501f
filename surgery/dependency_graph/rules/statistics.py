"""Hand-written channel statistics: a reduction whose result is broadcast back into a tensor.

RMSNorm written out (``x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)``), an L2
normalisation (``x / x.pow(2).sum(1, keepdim=True).sqrt()``), a LayerNorm written out, or weight
standardisation (``(w - w.mean((1, 2, 3), keepdim=True)) / w.std(...)``) reduce a dim to one
statistic per sample and scale the tensor with it along that dim. Removing entries of the dim changes
the statistic: the dim is a cross-channel group, like ``nn.LayerNorm``'s, not a stop.

``broadcast_points`` follows the statistic forward from the reduction through ops that keep it a
statistic (elementwise ops, ``unsqueeze``, ``[:, None]``, a view that restores the reduced dims as
ones) to the ops that broadcast it back along a reduced dim (an elementwise op or ``expand`` whose
output has the full size there). The reduction rule then marks the reduced dims cross-channel instead
of leaving them stopped, and records each point; the point's own rule couples the reduced dim of the
reduction's input with its output dim (``couple_points``). A reduction that never comes back (global
pooling over channels feeding a linear) keeps its reduced dims stopped.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from ..context import BuildCtx
from ._registry import lookup
from .common import op_name
from .slicing import _index_plan

__all__ = ["broadcast_points", "mark_statistic", "couple_points"]

#: rules whose output is an elementwise function of their tensor operands (broadcasting allowed)
_ELEMENTWISE = frozenset({"elementwise_unary", "elementwise_broadcast", "cast_like", "dropout"})
_EXPANDS = frozenset({"expand", "expand_as", "broadcast_to"})
_RESHAPES = frozenset({"view", "reshape", "view_as", "reshape_as"})
_MAX_STEPS = 64


_NEW = object()  # a dim an index or unsqueeze inserts


def _restore(origin: list, missing: list[int]) -> tuple:
    """Fill inserted dims (``_NEW``) with the reduced dims they restore: the one that fits the order of
    the dims around it, else None (a dim the statistic does not vary along)."""
    for i, v in enumerate(origin):
        if v is not _NEW:
            continue
        before = [o for o in origin[:i] if isinstance(o, int)]
        after = [o for o in origin[i + 1 :] if isinstance(o, int)]
        fits = [m for m in missing if all(b < m for b in before) and all(m < a for a in after)]
        origin[i] = fits[0] if fits else None
        if fits:
            missing.remove(fits[0])
    return tuple(origin)


def _next_origin(user: torch.fx.Node, node: torch.fx.Node, origin: tuple, reduced: frozenset, full: tuple):
    """Where each dim of ``user``'s output comes from (input dims of the reduction), or None when
    ``user`` does not keep ``node`` a statistic. ``full``: the reduction's input shape."""
    out = user.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return None
    value = node.meta["val"]
    name = op_name(user.target)
    missing = sorted(d for d in reduced if d not in origin)
    if name == "unsqueeze" and user.args and user.args[0] is node:
        dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
        if not isinstance(dim, int):
            return None
        new = list(origin)
        new.insert(dim % out.dim(), _NEW)
        return _restore(new, missing)
    if user.target is operator.getitem and user.args[0] is node:
        plan = _index_plan(value, user.args[1])
        if plan is None or any(p[0] not in ("slice", "new") for p in plan):
            return None
        if any(p[0] == "slice" and p[3] != slice(None) for p in plan):
            return None
        new = [_NEW] * out.dim()
        for p in plan:
            if p[0] == "slice":
                new[p[2]] = origin[p[1]]
        return _restore(new, missing)
    if name in _RESHAPES and user.args and user.args[0] is node:
        kept = tuple(1 if d in reduced else s for d, s in enumerate(full))
        if tuple(out.shape) == tuple(value.shape):
            return origin
        if tuple(out.shape) == kept:
            return tuple(range(len(full)))
        return None
    rule = lookup(user) if user.op in ("call_function", "call_method") else None
    if name in _EXPANDS or (rule is not None and rule.name in _ELEMENTWISE):
        if value.dim() > out.dim():
            return None
        return (None,) * (out.dim() - value.dim()) + tuple(origin)
    return None


def broadcast_points(node: torch.fx.Node, x: torch.fx.Node, reduced) -> list[tuple[str, int, int]]:
    """``(point node, reduced input dim, output dim)`` for every op that broadcasts the statistic
    computed by ``node`` (a reduction of ``x`` over ``reduced``) back along a reduced dim, into a
    dim of the same size (a statistic added to a tensor of another width is not a normalisation)."""
    full = tuple(x.meta["val"].shape)
    reduced = frozenset(reduced)
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor) or not reduced:
        return []
    start = tuple(range(len(full))) if out.dim() == len(full) else tuple(d for d in range(len(full)) if d not in reduced)
    points: list[tuple[str, int, int]] = []
    todo, seen, steps = [(node, start)], set(), 0
    while todo and steps < _MAX_STEPS:
        cur, origin = todo.pop()
        for user in cur.users:
            steps += 1
            nxt = _next_origin(user, cur, origin, reduced, full)
            if nxt is None:
                continue
            shape = user.meta["val"].shape
            back = [(d, o) for o, d in enumerate(nxt) if d in reduced and shape[o] > 1]
            if back:  # only back into a dim as wide as the one summarised: a tensor like the input
                points += [(user.name, d, o) for d, o in back if shape[o] == full[d]]
                continue
            if user.name not in seen:
                seen.add(user.name)
                todo.append((user, nxt))
    return points


def mark_statistic(ctx: BuildCtx, x: torch.fx.Node, reduced, what: str) -> None:
    """Called by a reduction of ``x``: reduced dims whose statistic comes back are cross-channel."""
    points = broadcast_points(ctx.node, x, reduced)
    pending = ctx.table.cache.setdefault("statistic_points", {})
    for name, d, o in points:
        detail = f"{what} over dim {d} ({ctx.node.name}) broadcast back"
        ctx.cross(ctx.sp(x, d), detail)
        pending.setdefault(name, []).append((x.name, d, o, detail))


def couple_points(ctx: BuildCtx) -> None:
    """Called by ops that broadcast: where this node broadcasts a statistic back along a dim, that
    dim of the statistic's input is coupled with the output dim (they have one size)."""
    for source, d, o, detail in ctx.table.cache.get("statistic_points", {}).get(ctx.node.name, ()):
        out = ctx.out(o)
        ctx.identity(ctx.table.tensor(source, (), d), out)
        ctx.cross(out, detail)
