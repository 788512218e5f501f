"""APoZ: Average Percentage of Zeros (Hu, Peng, Tai, Tang, "Network Trimming: A Data-Driven Neuron
Pruning Approach towards Efficient Deep Architectures", arXiv 1607.03250, 2016).

``APoZ_c = (1 / (N * M)) * sum_n sum_m 1[a_{n,c,m} == 0]``: the fraction of zeros in channel ``c``'s
activation over the N calibration images and its M positions. A channel that is mostly zero
contributes little, so a high APoZ is pruned first: the score is ``1 - APoZ`` (higher = kept).

Where the activation is observed: at the input of each conv / linear that reads the group's channels
(see :mod:`surgery.methods._activations`), i.e. after BatchNorm and ReLU, and after any pooling
between the ReLU and the consumer (the paper counts the ReLU output; a max-pool in between sees fewer
zeros). For a ``flatten -> linear`` consumer the M positions of a channel are its entries in the
flattened vector. A group read at several tensors (a residual stream) counts zeros over all of them:
``APoZ_c = zeros_c / values_c`` summed over every observed tensor, so values stay multiples of
``1 / (values_c)``. Counts are streamed batch by batch; nothing is stored.

``zero_tol``: a value counts as zero when ``|a| <= zero_tol`` (0: exact zeros, as after a ReLU).
Scores are absolute fractions, comparable across groups, so the global policy compares them raw
(``normalize="none"``).
"""

from __future__ import annotations

import numpy as np
import torch

from ._activations import Observation, observe, plan_observations
from ._registry import Option, register_method
from .context import ScoreContext, Scores

PAPER = "Hu et al., Network Trimming: A Data-Driven Neuron Pruning Approach towards Efficient Deep Architectures, 2016"


def channel_sum_all(t: torch.Tensor, o: Observation) -> torch.Tensor:
    """(samples, positions, entries) -> per-channel sum over samples, positions and entries."""
    out = torch.zeros(o.size, dtype=t.dtype, device=t.device)
    return out.index_add_(0, o.units.to(t.device), t.sum((0, 1)))


def zero_fraction(ctx: ScoreContext, zero_tol: float = 0.0) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """APoZ of every observable group (``{gid: per-channel fraction of zeros}``) and the skipped ones."""
    plan, skipped = plan_observations(ctx)
    zeros = {gid: torch.zeros(obs[0].size, dtype=torch.float64) for gid, obs in plan.items()}
    total = {gid: torch.zeros(obs[0].size, dtype=torch.float64) for gid, obs in plan.items()}

    def visit(gid: int, k: int, o: Observation, a: torch.Tensor, _):
        is_zero = (a.abs() <= zero_tol).to(torch.float64)  # exact integer counts in float64
        zeros[gid] += channel_sum_all(is_zero, o).cpu()
        total[gid] += o.entries(a.shape[1]) * a.shape[0]

    observe(ctx, plan, visit)
    return {gid: (zeros[gid] / total[gid]).numpy() for gid in plan}, skipped


@register_method("apoz", "1 - fraction of zeros of the channel's activation (high APoZ pruned first)", paper=PAPER,
                 needs=("data",), normalize="none",
                 options=(Option("zero_tol", float, 0.0, "a value counts as zero when |a| <= zero_tol", low=0.0),))
def apoz(ctx: ScoreContext, zero_tol: float):
    """Score = 1 - APoZ, the fraction of non-zero activations of the channel at its consumers' inputs."""
    fractions, skipped = zero_fraction(ctx, zero_tol)
    return Scores({gid: 1.0 - f for gid, f in fractions.items()}, skipped)
