"""FLAP: fluctuation-based structured pruning with bias compensation (An, Zhao, Yu, Tang, Wang,
"Fluctuation-based Adaptive Structured Pruning for Large Language Models", AAAI 2024).

A channel whose input to the next layer barely fluctuates over the tokens can be replaced by its
mean: the consumer then adds ``W[:, c] * mean_c`` to its bias and loses nothing else. FLAP scores the
damage of doing that::

    score_c = sum over consumers L, over the input columns j of c at L, of  Var_tokens(X^L_j) * ||W^L_{:, j}||_2^2

where ``X^L`` is what consumer ``L`` reads (its input, :mod:`surgery.methods._activations`) and the
variance is over every calibration token; an MLP neuron has one column, an attention head sums the
terms of its ``head_dim`` columns (FLAP's code scores heads that way). With ``compensate=True`` (default) the plan carries each
removed channel's mean (``GroupPlan.shift``: one value per input column the channel owns, so an
attention head, or a GQA group of them, carries a mean for each of its output-projection columns) and the rewrite adds ``sum_c W[:, cols(c)] @ mean_c`` to
every consumer's bias, in both modes (:mod:`surgery.compensation`), so pruned == masked still holds
and the pruned output's mean over the calibration tokens equals the original's. A linear without a
bias (Llama's ``o_proj`` / ``down_proj``) is given one holding the compensation, as FLAP's code does
(a Hugging Face config then gets ``attention_bias`` / ``mlp_bias``, :func:`surgery.hf.sync_config`).
A group read at more than one tensor (a residual stream: a different mean at every reader), or with
a consumer that is not a linear (a conv: its zero padding does not see the mean), is scored but not
compensated; ``Plan.notes`` says so. FLAP's per-layer standardisation of the scores is the global
policy's ``normalize="mean"`` here.
"""

from __future__ import annotations

import numpy as np
import torch

from ..compensation import why_not
from ..roles import consumers
from ._activations import Observation, observe, plan_observations
from ._registry import Option, register_method
from .context import ScoreContext, Scores
from .wanda import Moments

PAPER = "An, Zhao, Yu, Tang, Wang, Fluctuation-based Adaptive Structured Pruning for Large Language Models (FLAP), AAAI 2024"


class _Entries:
    """Per entry of one observed tensor (the group's entries along its channel dim): token count,
    sum and sum of squares (float64)."""

    def __init__(self, obs: Observation):
        self.obs = obs
        self.tokens = 0
        self.total = torch.zeros(len(obs.index), dtype=torch.float64)
        self.squares = torch.zeros(len(obs.index), dtype=torch.float64)

    def add(self, a: torch.Tensor) -> None:
        """``a``: (samples, positions, entries), float64."""
        self.tokens += a.shape[0] * a.shape[1]
        self.total += a.sum((0, 1)).cpu()
        self.squares += (a * a).sum((0, 1)).cpu()

    def stats(self) -> Moments:
        """Per entry: its token count, sum and sum of squares (mean and variance over the tokens)."""
        return Moments(torch.full_like(self.total, float(self.tokens)), self.total, self.squares)

    def means(self) -> list:
        """Per group channel: its mean, one value per entry it owns (ascending entry index, the order
        of the consumer's weight columns: ``obs.index`` is ascending); a float for a channel of one entry."""
        per: list[list[float]] = [[] for _ in range(self.obs.size)]
        for u, m in zip(self.obs.units.tolist(), self.stats().mean.tolist()):
            per[u].append(m)
        return [float(v[0]) if len(v) == 1 else tuple(v) for v in per]


def _entry_moments(ctx: ScoreContext) -> tuple[dict[int, dict[str, _Entries]], dict[int, str]]:
    """``{gid: {consumer input node: _Entries}}`` over the calibration data, and the skipped groups."""
    plan, skipped = plan_observations(ctx)
    out: dict[int, dict[str, _Entries]] = {gid: {} for gid in plan}

    def visit(gid: int, k: int, o: Observation, a: torch.Tensor, _):
        out[gid].setdefault(o.node, _Entries(o)).add(a)

    observe(ctx, plan, visit)
    return out, skipped


def _fluctuation(ctx: ScoreContext, group, entries: dict) -> np.ndarray:
    """Per channel: the sum over its input columns ``j`` at every consumer of ``Var(X_j) * ||W_{:,j}||^2``
    (a head of ``head_dim`` columns sums its columns' terms, as FLAP's code does). A consumer whose
    weight columns are not the observed entries (a reshaped input) falls back to the channel's pooled
    variance times its columns' summed squared norm."""
    total = np.zeros(group.size, dtype=np.float64)
    for site, member in consumers(ctx.graph, group):
        e, w = entries.get(site.input), ctx.tensor(site.owner, site.weight)
        if e is None or w is None:
            continue
        dims = [d for d in range(w.dim()) if d != member.dim]
        norms = (w.detach().double().square().sum(dims) if dims else w.detach().double().square()).cpu()
        # an observation is taken at the consumer's input along its contracting dim: its entries are
        # exactly the weight's columns of the group (``_activations.observations``)
        np.add.at(total, e.obs.units.numpy(), (e.stats().variance * norms[e.obs.index]).numpy())
    return total


def _why_not_compensated(ctx: ScoreContext, group, entries: dict) -> str:
    if len(entries) != 1:
        return f"read at {len(entries)} different tensors (each has its own mean)"
    for site, _ in consumers(ctx.graph, group):
        why = why_not(ctx.graph, site)
        if why:
            return why
    return ""


@register_method("flap", "fluctuation: input variance over tokens x squared consumer column norm; removed channels' means folded into the consumers' biases (FLAP)",
                 paper=PAPER, needs=("data",),
                 options=(Option("compensate", bool, True, "add the removed channels' mean contribution to the consumers' biases"),))
def flap(ctx: ScoreContext, compensate: bool):
    """Score = sum over consumers of Var(X_c) * ||W_{:,c}||^2; bias compensation with the means."""
    observed, skipped = _entry_moments(ctx)
    scores, shift = {}, {}
    for g in ctx.groups:
        if g.id not in observed:
            continue
        scores[g.id] = _fluctuation(ctx, g, observed[g.id])
        if compensate:
            why = _why_not_compensated(ctx, g, observed[g.id])
            if why:
                skipped[g.id] = f"pruned without bias compensation: {why}"
            else:
                shift[g.id] = next(iter(observed[g.id].values())).means()
    return Scores(scores, skipped, shift=shift)
