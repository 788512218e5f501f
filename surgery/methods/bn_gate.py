"""BN gates (network slimming, Liu et al., ICCV 2017; seed 002-003).

A channel scores ``|gamma|``, the absolute scale of the BatchNorm (or GroupNorm / LayerNorm affine)
layers on it, summed when several norm layers carry the same channels (a residual stream). Slimming
ranks the raw ``|gamma|`` of all layers globally with no per-layer normalisation, so this method's
global policy default is ``normalize="none"``. Train with an L1 penalty on gamma first (``slimming``)
for the scores to mean much. A group with no norm layer is left whole, with that reason.
"""

from __future__ import annotations

from ..roles import norm_members
from ._registry import register_method
from .context import ScoreContext, Scores, member_reduce

SLIMMING = "Liu et al., Learning Efficient Convolutional Networks through Network Slimming, ICCV 2017"


@register_method("bn-gate", "|gamma| of the norm layers on the channel (network slimming)", paper=SLIMMING, normalize="none")
def bn_gate(ctx: ScoreContext):
    """Sum of |gamma| over the group's norm layers."""
    out = Scores({})
    for g in ctx.groups:
        members = norm_members(ctx.graph.root, g)
        if not members:
            out.skipped[g.id] = "no BatchNorm / GroupNorm / LayerNorm scale on these channels"
            continue
        out.scores[g.id] = member_reduce(ctx.graph.root, g, lambda t, dims: t.abs(), members=members)
    return out
