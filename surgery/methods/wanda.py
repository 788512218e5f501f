"""Wanda, structured (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large
Language Models", ICLR 2024; the per-channel form its structured ablation and FLAP compare with).

Wanda scores a weight by ``|W_ij| * ||X_j||_2``: its magnitude times the L2 norm of the input feature
it multiplies, over every calibration token. Removing a channel ``c`` of a group removes input
column ``c`` of every layer that reads it, so the structured score sums the unstructured one over
those columns::

    score_c = sum over consumers L of  ||X^L_c||_2 * sum_i |W^L_ic|

where ``X^L`` is what consumer ``L`` reads (observed at its input, :mod:`surgery.methods._activations`:
after the norm, the activation function, the gate product) and ``||X_c||_2`` runs over all the
tokens (samples x positions) of the calibration data. A channel whose activation is always zero
scores 0. Per-group scales differ, so the global policy normalises by the group mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..roles import consumers
from ._activations import Observation, channel_sum, observe, plan_observations
from ._registry import register_method
from .context import ScoreContext, Scores

__all__ = ["Moments", "consumer_moments", "column_reduce", "wanda_structured"]

PAPER = "Sun, Liu, Bair, Kolter, A Simple and Effective Pruning Approach for Large Language Models (Wanda), ICLR 2024"


@dataclass
class Moments:
    """Per group channel at one consumer input: token count, sum and sum of squares (float64)."""

    count: torch.Tensor
    total: torch.Tensor
    squares: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count.clamp_min(1.0)

    @property
    def variance(self) -> torch.Tensor:
        """Population variance over the tokens (never negative)."""
        return (self.squares / self.count.clamp_min(1.0) - self.mean.square()).clamp_min(0.0)


def consumer_moments(ctx: ScoreContext) -> tuple[dict[int, dict[str, Moments]], dict[int, str]]:
    """``{gid: {consumer input node: Moments}}`` over the calibration data, and the skipped groups."""
    plan, skipped = plan_observations(ctx)
    out: dict[int, dict[str, Moments]] = {gid: {} for gid in plan}

    def visit(gid: int, k: int, o: Observation, a: torch.Tensor, _):
        m = out[gid].get(o.node)
        if m is None:
            z = torch.zeros(o.size, dtype=torch.float64)
            m = out[gid][o.node] = Moments(z.clone(), z.clone(), z.clone())
        m.count += o.entries(a.shape[1]) * a.shape[0]
        m.total += channel_sum(a, o).sum(0).cpu()
        m.squares += channel_sum(a * a, o).sum(0).cpu()

    observe(ctx, plan, visit)
    return out, skipped


def column_reduce(ctx: ScoreContext, group, reduce) -> list[tuple[str, np.ndarray]]:
    """Per consumer of ``group``: ``(input node, per-channel reduce(weight columns))``; ``reduce(t, dims)``
    reduces a weight over every dim but the input one (e.g. ``|W|.sum``)."""
    out = []
    for site, member in consumers(ctx.graph, group):
        w = ctx.tensor(site.owner, site.weight)
        if w is None:
            continue
        dims = [d for d in range(w.dim()) if d != member.dim]
        per_index = reduce(w.detach().double(), dims).cpu().numpy()
        col = np.zeros(group.size, dtype=np.float64)
        np.add.at(col, member.units, per_index[member.indices])
        out.append((site.input, col))
    return out


@register_method("wanda-structured", "sum over the consumers' weight columns of |W| x the input's L2 norm over tokens (Wanda, per channel)",
                 paper=PAPER, needs=("data",))
def wanda_structured(ctx: ScoreContext):
    """Score = sum over consumers of ||X_c||_2 * sum_i |W_ic|."""
    moments, skipped = consumer_moments(ctx)
    scores = {}
    for g in ctx.groups:
        if g.id not in moments:
            continue
        total = np.zeros(g.size, dtype=np.float64)
        for node, col in column_reduce(ctx, g, lambda t, dims: t.abs().sum(dims) if dims else t.abs()):
            m = moments[g.id].get(node)
            if m is not None:
                total += col * m.squares.sqrt().numpy()
        scores[g.id] = total
    return Scores(scores, skipped)
