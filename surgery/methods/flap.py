"""FLAP: fluctuation-based structured pruning with bias compensation (An, Zhao, Yu, Tang, Wang,
"Fluctuation-based Adaptive Structured Pruning for Large Language Models", AAAI 2024).

A channel whose input to the next layer barely fluctuates over the tokens can be replaced by its
mean: the consumer then adds ``W[:, c] * mean_c`` to its bias and loses nothing else. FLAP scores the
damage of doing that::

    score_c = sum over consumers L of  Var_tokens(X^L_c) * ||W^L_{:, c}||_2^2

where ``X^L`` is what consumer ``L`` reads (its input, :mod:`surgery.methods._activations`) and the
variance is over every calibration token. With ``compensate=True`` (default) the plan carries each
removed channel's mean (``GroupPlan.shift``) and the rewrite adds ``sum_c mean_c * W[:, c]`` to every
consumer's bias, in both modes, so pruned == masked still holds and the pruned output's mean over
the calibration tokens equals the original's (for linear consumers). A group read at more than one
tensor (a residual stream: a different mean at every reader), or whose consumers are not linears
with a bias, is scored but not compensated; ``Plan.notes`` says so. FLAP's per-layer
standardisation of the scores is the global policy's ``normalize="mean"`` here.
"""

from __future__ import annotations

import numpy as np

from ..roles import consumers
from ._registry import Option, register_method
from .context import ScoreContext, Scores
from .wanda import column_reduce, consumer_moments

PAPER = "An, Zhao, Yu, Tang, Wang, Fluctuation-based Adaptive Structured Pruning for Large Language Models (FLAP), AAAI 2024"


def _why_not_compensated(ctx: ScoreContext, group, moments: dict) -> str:
    if len(moments) != 1:
        return f"read at {len(moments)} different tensors (each has its own mean)"
    for site, _ in consumers(ctx.graph, group):
        if site.kind != "linear" or site.bias is None:
            return f"{site.owner or 'a consumer'} is not a linear with a bias"
    return ""


@register_method("flap", "fluctuation: input variance over tokens x squared consumer column norm; removed channels' means folded into the consumers' biases (FLAP)",
                 paper=PAPER, needs=("data",),
                 options=(Option("compensate", bool, True, "add the removed channels' mean contribution to the consumers' biases"),))
def flap(ctx: ScoreContext, compensate: bool):
    """Score = sum over consumers of Var(X_c) * ||W_{:,c}||^2; bias compensation with the means."""
    moments, skipped = consumer_moments(ctx)
    scores, shift = {}, {}
    for g in ctx.groups:
        if g.id not in moments:
            continue
        total = np.zeros(g.size, dtype=np.float64)
        for node, col in column_reduce(ctx, g, lambda t, dims: t.square().sum(dims) if dims else t.square()):
            m = moments[g.id].get(node)
            if m is not None:
                total += col * m.variance.numpy()
        scores[g.id] = total
        if compensate:
            why = _why_not_compensated(ctx, g, moments[g.id])
            if why:
                skipped[g.id] = f"pruned without bias compensation: {why}"
            else:
                shift[g.id] = next(iter(moments[g.id].values())).mean.numpy()
    return Scores(scores, skipped, shift=shift)
