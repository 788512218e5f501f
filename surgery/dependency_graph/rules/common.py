"""Helpers shared by op rules: tensor arguments, broadcasting, reshape alignment."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx

from ..context import BuildCtx
from .heads import attention_head_sizes, gqa_merge
from .rotary import rotated_sizes

__all__ = ["op_name", "tensor_args", "unary", "broadcast", "align_reshape", "couple_reshape", "normalize_dims"]


def op_name(target) -> str:
    """``"permute"`` for ``Tensor.permute``, ``torch.permute`` and ``aten.permute.default`` alike."""
    if isinstance(target, str):
        return target
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(target, "__name__", "")


def tensor_args(ctx: BuildCtx) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    torch.fx.node.map_arg(
        (ctx.node.args, ctx.node.kwargs),
        lambda n: out.append(n) if isinstance(n.meta.get("val"), torch.Tensor) and n not in out else None,
    )
    return out


def unary(ctx: BuildCtx) -> None:
    """Output has the input's shape and each entry depends on the same entry only."""
    xs = tensor_args(ctx)
    if xs and isinstance(ctx.out_val(), torch.Tensor):
        ctx.same_dims(xs[0])


def broadcast(ctx: BuildCtx) -> None:
    """Elementwise op with numpy broadcasting: equal-sized aligned dims are coupled."""
    out = ctx.out_val()
    if not isinstance(out, torch.Tensor):
        return
    for x in tensor_args(ctx):
        v = x.meta["val"]
        off = out.dim() - v.dim()
        if off < 0:
            continue
        for d in range(v.dim()):
            if v.shape[d] == out.shape[off + d]:
                ctx.identity(ctx.sp(x, d), ctx.out(off + d))


def normalize_dims(dims, ndim: int) -> list[int]:
    if dims is None:
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return [d % ndim for d in dims]


def align_reshape(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of non-1 dims of ``src`` and ``dst`` whose products agree.

    Returns ``[(src_dims, dst_dims), ...]`` or None when the shapes do not factor into aligned runs.
    """
    a = [i for i, s in enumerate(src) if s != 1]
    b = [j for j, s in enumerate(dst) if s != 1]
    blocks = []
    i = j = 0
    while i < len(a) and j < len(b):
        si, sj = [a[i]], [b[j]]
        pi, pj = src[a[i]], dst[b[j]]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj and i < len(a):
                si.append(a[i])
                pi *= src[a[i]]
                i += 1
            elif pj < pi and j < len(b):
                sj.append(b[j])
                pj *= dst[b[j]]
                j += 1
            else:
                return None
        blocks.append((si, sj))
    if i != len(a) or j != len(b):
        return None
    return blocks


def _coordinate(flat: np.ndarray, sizes: list[int], k: int) -> np.ndarray:
    inner = math.prod(sizes[k + 1 :])
    return (flat // inner) % sizes[k]


def couple_reshape(ctx: BuildCtx, x: torch.fx.Node, src: tuple, dst: tuple, path: tuple = ()) -> None:
    """Couple the dims of a reshape-like op (view, reshape, flatten, unflatten, squeeze ...).

    A run of several dims merged into one (or split from one) maps onto exactly one dim of the run:
    the one that already reaches a parameter (a channel dim), else the largest, else the outermost;
    in a model with rotary embeddings, not a dim of the rotated size where another is left (the
    heads rather than the head dim, ``rotary.py``), nor of an attention's head-dim size (whole heads
    are the unit, ``heads.py``). Merging two dims of the same run would fuse every channel into one unit.
    """
    blocks = align_reshape(tuple(src), tuple(dst))
    if blocks is None:
        return
    table = ctx.table
    avoid = None
    for si, sj in blocks:
        if len(si) == 1 and len(sj) == 1:
            ctx.identity(ctx.sp(x, si[0], path), ctx.out(sj[0]))
            continue
        if len(si) > 1 and len(sj) > 1:
            continue  # many-to-many: no coupling (stopped), never guessed
        if len(sj) == 1:  # merge: many src dims -> one dst dim
            sizes = [src[d] for d in si]
            fed = [table.fed[ctx.sp(x, d, path)] for d in si]
            k = gqa_merge(ctx, [ctx.sp(x, d, path) for d in si])
            if k is None:
                avoid = avoid if avoid is not None else rotated_sizes(ctx) | attention_head_sizes(ctx)
                k = _pick(sizes, fed, avoid)
            whole = ctx.out(sj[0])
            flat = np.arange(math.prod(sizes))
            table.pairs(ctx.sp(x, si[k], path), _coordinate(flat, sizes, k), whole, flat)
        else:  # split: one src dim -> many dst dims
            sizes = [dst[d] for d in sj]
            avoid = avoid if avoid is not None else rotated_sizes(ctx) | attention_head_sizes(ctx)
            k = _pick(sizes, [False] * len(sizes), avoid)
            whole = ctx.sp(x, si[0], path)
            flat = np.arange(math.prod(sizes))
            table.pairs(whole, flat, ctx.out(sj[k]), _coordinate(flat, sizes, k))


def _pick(sizes: list[int], fed: list[bool], avoid: frozenset[int] = frozenset()) -> int:
    candidates = [i for i, f in enumerate(fed) if f] or list(range(len(sizes)))
    heads = [i - 1 for i in range(1, len(sizes)) if sizes[i] in avoid and i - 1 in candidates and sizes[i - 1] not in avoid]
    if heads:  # the dim right before a head dim holds the heads: (3, heads, head_dim) of a fused qkv
        return heads[-1]
    candidates = [i for i in candidates if sizes[i] not in avoid] or candidates
    return max(candidates, key=lambda i: (sizes[i], -i))
