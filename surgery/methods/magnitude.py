"""Magnitude criteria.

* ``l1`` / ``l2`` (Li et al. 2017, "Pruning Filters for Efficient ConvNets"): a channel scores the norm
  of **its own filter** in the layer that produces it (the ``C_in x K x K`` kernel slice of a conv, the
  row of a linear, the column of an embedding); bias, BatchNorm and the next layer play no part. When
  several layers write the same channels (a residual stream), their filter norms are summed. A group
  that no conv / linear / embedding produces is left whole, with that reason.
* ``group-l1`` / ``group-l2``: the norm of *every* weight removed with the channel (producer filters,
  norm affine parameters, consumer input columns, attention projections). A channel whose slices are
  all zero scores exactly 0. Buffers (BN running statistics) are not weights and are not scored.
"""

from __future__ import annotations

import numpy as np

from ..roles import producers
from ._registry import register_method
from .context import ScoreContext, Scores, member_reduce

LI = "Li et al., Pruning Filters for Efficient ConvNets, ICLR 2017"


def _reduce(p: int):
    return lambda t, dims: t.abs().pow(p).sum(dim=dims) if dims else t.abs().pow(p)


def _finish(total: np.ndarray, p: int) -> np.ndarray:
    return total if p == 1 else np.sqrt(total)


def _filter_norms(ctx: ScoreContext, p: int) -> Scores:
    out = Scores({})
    for g in ctx.groups:
        members = [m for _, m in producers(ctx.graph, g)]
        if not members:
            out.skipped[g.id] = "no conv, linear or embedding produces these channels (no filter to score)"
            continue
        out.scores[g.id] = _finish(member_reduce(ctx.graph.root, g, _reduce(p), members=members), p)
    return out


def _group_norms(ctx: ScoreContext, p: int) -> dict[int, np.ndarray]:
    return {g.id: _finish(member_reduce(ctx.graph.root, g, _reduce(p)), p) for g in ctx.groups}


@register_method("l1", "L1 norm of the channel's own filter in the layer that produces it", paper=LI)
def l1(ctx: ScoreContext):
    """Li et al.'s criterion: sum of |w| over the producing filter (summed over producers)."""
    return _filter_norms(ctx, 1)


@register_method("l2", "L2 norm of the channel's own filter in the layer that produces it", paper=LI)
def l2(ctx: ScoreContext):
    """L2 variant of Li et al.'s criterion."""
    return _filter_norms(ctx, 2)


@register_method("group-l1", "L1 norm of every weight removed with the channel (all members of the group)")
def group_l1(ctx: ScoreContext):
    """Producer filters, norm affine parameters, consumer input columns: all of them."""
    return _group_norms(ctx, 1)


@register_method("group-l2", "L2 norm of every weight removed with the channel (all members of the group)")
def group_l2(ctx: ScoreContext):
    """L2 over every parameter slice removed with the channel."""
    return _group_norms(ctx, 2)
