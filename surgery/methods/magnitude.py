"""Magnitude criteria: L1 (Li et al. 2017, "Pruning Filters for Efficient ConvNets") and L2.

Group importance aggregates *all* members of a group: the score of a channel is the norm of every
parameter entry that is removed with it (producer filters, BN affine parameters, consumer input
columns, attention projections, ...). A channel whose every slice is zero therefore scores exactly
0 and is removed first. Buffers (BN running statistics) are not weights and are not scored.
"""

from __future__ import annotations

import numpy as np
import torch

from ._registry import register_method
from .common import member_reduce


def _norm_scores(model, graph, groups, p: int) -> dict[int, np.ndarray]:
    out = {}
    for g in groups:
        total = member_reduce(model, g, lambda t, dims: t.abs().pow(p).sum(dim=dims) if dims else t.abs().pow(p))
        out[g.id] = total if p == 1 else np.sqrt(total)
    return out


@register_method("l1", "L1 norm of every weight removed with the channel (Li et al. 2017)")
def l1(model, graph, groups, data=None, **options):
    return _norm_scores(model, graph, groups, 1)


@register_method("l2", "L2 norm of every weight removed with the channel")
def l2(model, graph, groups, data=None, **options):
    return _norm_scores(model, graph, groups, 2)


__all__ = ["l1", "l2", "torch"]
