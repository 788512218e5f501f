"""Rotary position embeddings: which dim sizes a model rotates (its head dims).

Rotary attention multiplies q and k of shape ``(B, H, L, head_dim)`` by ``cos``/``sin`` tables of
shape ``(L, head_dim)`` and adds ``rotate_half(x) = cat((-x[..., d/2:], x[..., :d/2]), -1)`` (or the
interleaved ``stack((-x[..., 1::2], x[..., ::2]), -1)``). The rotation fixes ``head_dim``: its
halves are paired and its frequencies come from a table. Heads stay removable.

A projection ``(B, L, H * head_dim)`` reshaped to ``(B, L, H, head_dim)`` maps its channels onto one
of the two dims (``common.couple_reshape``); by default the larger, which is usually ``head_dim``.
In a model that rotates ``head_dim``-sized dims, that choice would tie every channel to the fixed
dim and stop them all, so reshapes there prefer another dim: the heads (``rotated_sizes``). The
rotation itself needs no rule of its own: slices, ``cat``, ``neg`` and the broadcast products with
the tables couple ``head_dim`` (or stop it) and never touch the head dim.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from ..context import BuildCtx

__all__ = ["rotated_sizes"]

_CATS = {torch.cat, torch.concat, torch.concatenate}
_NEG_METHODS = {"neg", "negative"}


def _value(x):
    return x.meta.get("val") if isinstance(x, torch.fx.Node) else x


def _negated(node) -> torch.fx.Node | None:
    """``x`` for ``-x``, ``torch.neg(x)``, ``x.neg()``, ``x * -1``; else None."""
    if not isinstance(node, torch.fx.Node) or not node.args:
        return None
    t = node.target
    if t in (operator.neg, torch.neg, torch.negative) or (node.op == "call_method" and t in _NEG_METHODS):
        return node.args[0]
    if t in (operator.mul, torch.mul) and len(node.args) == 2:
        factor = _value(node.args[1])
        if isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor == -1:
            return node.args[0]
    return None


def _last_slice(node) -> tuple[torch.fx.Node, slice] | None:
    """``(x, s)`` for ``x[..., s]`` (a slice of the last dim of ``x``)."""
    if not isinstance(node, torch.fx.Node) or node.target is not operator.getitem:
        return None
    src, index = node.args[0], node.args[1]
    if not isinstance(_value(src), torch.Tensor):
        return None
    items = list(index) if isinstance(index, tuple) else [index]
    if not items or not isinstance(items[-1], slice):
        return None
    rest = items[:-1]
    nd = _value(src).dim()
    if not (rest == [Ellipsis] or (len(rest) == nd - 1 and all(r == slice(None) for r in rest))):
        return None
    s = items[-1]
    return src, slice(_value(s.start), _value(s.stop), _value(s.step))


def _half(node, which: str) -> torch.fx.Node | None:
    """The tensor whose last dim ``node`` is the ``which`` ("lo"/"hi") half of, or None."""
    got = _last_slice(node)
    if got is not None:
        src, s = got
        n = _value(src).shape[-1]
        h = n // 2
        if n % 2 or s.step not in (None, 1):
            return None
        lo = s.start in (None, 0) and s.stop == h
        hi = s.start == h and s.stop in (None, n)
        return src if (lo if which == "lo" else hi) else None
    if isinstance(node, torch.fx.Node) and node.target is operator.getitem and isinstance(node.args[1], int):
        parts = node.args[0]  # x.chunk(2, -1)[i], torch.split(x, h, -1)[i]
        value = _value(parts)
        if isinstance(parts, torch.fx.Node) and isinstance(value, (tuple, list)) and len(value) == 2 and parts.args:
            src = parts.args[0]
            v = _value(src)
            if isinstance(v, torch.Tensor) and all(p.shape[-1] * 2 == v.shape[-1] for p in value):
                if node.args[1] % 2 == (0 if which == "lo" else 1):
                    return src
    return None


def _interleaved(node, which: str) -> torch.fx.Node | None:
    """The tensor for ``x[..., ::2]`` ("lo") / ``x[..., 1::2]`` ("hi")."""
    got = _last_slice(node)
    if got is None:
        return None
    src, s = got
    start = 0 if which == "lo" else 1
    return src if s.step == 2 and (s.start or 0) == start and s.stop is None else None


def _rotation_size(node: torch.fx.Node) -> int | None:
    """Size of the dim that ``node`` rotates (``rotate_half`` written out), or None."""
    if node.op != "call_function" or not node.args:
        return None
    items = node.args[0]
    if not isinstance(items, (list, tuple)) or len(items) != 2:
        return None
    first, second = _negated(items[0]), items[1]
    out = _value(node)
    if first is None or not isinstance(out, torch.Tensor):
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if node.target in _CATS and isinstance(dim, int) and dim % out.dim() == out.dim() - 1:
        src = _half(first, "hi")
        if src is not None and _half(second, "lo") is src:
            return _value(src).shape[-1]
    if node.target is torch.stack and isinstance(dim, int) and dim % out.dim() == out.dim() - 1:
        src = _interleaved(first, "hi")
        if src is not None and _interleaved(second, "lo") is src:
            return _value(src).shape[-1]
    return None


def rotated_sizes(ctx: BuildCtx) -> frozenset[int]:
    """Sizes of the dims this model rotates (one scan of the graph per build)."""
    cache = ctx.table.cache
    if "rotated_sizes" not in cache:
        sizes = {_rotation_size(n) for n in ctx.node.graph.nodes}
        cache["rotated_sizes"] = frozenset(s for s in sizes if s)
    return cache["rotated_sizes"]
