"""Entropy of a channel's pooled response (Luo & Wu, "An Entropy-based Pruning Method for CNN
Compression", arXiv 1706.05791, 2017).

Each channel's activation is global-average-pooled over its positions for every calibration image,
giving an ``n x C`` matrix. For channel ``j`` the range ``[min_j, max_j]`` of its n values is split
into ``bins`` equal bins, ``p_k`` is the fraction of images whose value falls in bin ``k`` (the
maximum goes in the last bin) and ``H_j = -sum_k p_k log p_k`` (natural log). A channel whose
response hardly changes from image to image carries little information: low entropy is pruned first.
A constant channel (``max == min``) has ``H = 0``. Because the bins follow each channel's own range,
H does not change when a channel is scaled by a positive factor; the flip side is that a channel
whose values differ only by rounding noise still spreads over the bins.

``bins`` (m) is an explicit option, default 10: the paper's value of m (and its image count) was NOT
verified — no code was released and the text was not reachable — so choose it deliberately.

Where the activation is observed: at the input of each conv / linear that reads the group's channels
(:mod:`surgery.methods._activations`), i.e. after BatchNorm, ReLU and any pooling; for a
``flatten -> linear`` consumer a channel's positions are its entries in the flattened vector. A group
read at several tensors (a residual stream) gets the mean of its entropies at each of them.

Memory: the pooled values are stored, C floats per image per observed tensor (bounded by the
calibration size, one pass over the data); the per-channel range is only known at the end.
Entropies are bounded by ``log m`` in every group, so the global policy compares them raw
(``normalize="none"``).
"""

from __future__ import annotations

import numpy as np
import torch

from ._activations import Observation, channel_sum, observe, plan_observations
from ._registry import Option, register_method
from .context import ScoreContext, Scores

PAPER = "Luo & Wu, An Entropy-based Pruning Method for CNN Compression, arXiv 1706.05791, 2017"


def binned_entropy(values: np.ndarray, bins: int) -> np.ndarray:
    """(n, C) values -> per-column entropy of the histogram over ``bins`` equal bins of its own range.

    >>> binned_entropy(np.array([[0.0, 5.0], [1.0, 5.0], [2.0, 5.0], [3.0, 5.0]]), 4).round(6).tolist()
    [1.386294, 0.0]
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"values must be (n, C), got shape {v.shape}")
    n, c = v.shape
    out = np.zeros(c, dtype=np.float64)
    if n == 0:
        return out
    lo, hi = v.min(0), v.max(0)
    span = hi - lo
    live = span > 0
    if not live.any():
        return out
    k = np.floor((v[:, live] - lo[live]) / span[live] * bins)
    k = np.clip(k, 0, bins - 1).astype(np.int64)
    counts = np.zeros((bins, int(live.sum())), dtype=np.float64)
    np.add.at(counts, (k, np.broadcast_to(np.arange(k.shape[1]), k.shape)), 1.0)
    p = counts / n
    with np.errstate(divide="ignore", invalid="ignore"):
        out[live] = -np.where(p > 0, p * np.log(p), 0.0).sum(0)
    return out


def pooled_responses(ctx: ScoreContext) -> tuple[dict[int, list[tuple[np.ndarray, np.ndarray]]], dict[int, str]]:
    """Per group, per observed tensor: (GAP values ``(n, size)``, observed channel mask); skipped groups."""
    plan, skipped = plan_observations(ctx)
    store: dict[int, list[list[torch.Tensor]]] = {gid: [[] for _ in obs] for gid, obs in plan.items()}

    def visit(gid: int, k: int, o: Observation, a: torch.Tensor, _):
        count = o.entries(a.shape[1])
        store[gid][k].append((channel_sum(a, o) / count.clamp_min(1.0).to(a.device)).cpu())

    observe(ctx, plan, visit)
    return {gid: [(torch.cat(store[gid][k]).numpy(), o.observed()) for k, o in enumerate(obs)]
            for gid, obs in plan.items()}, skipped


@register_method("entropy", "entropy of the channel's average-pooled response over the images (low pruned first)",
                 paper=PAPER, needs=("data",), normalize="none",
                 options=(Option("bins", int, 10, "number of equal bins over each channel's range (paper value unverified)",
                                 low=2),))
def entropy(ctx: ScoreContext, bins: int):
    """Score = H of the histogram of the channel's per-image mean activation at its consumers' inputs."""
    responses, skipped = pooled_responses(ctx)
    out = Scores({}, skipped)
    for gid, per_tensor in responses.items():
        total = np.zeros(per_tensor[0][1].size, dtype=np.float64)
        seen = np.zeros_like(total)
        for values, observed in per_tensor:
            total[observed] += binned_entropy(values[:, observed], bins)
            seen += observed
        out.scores[gid] = total / np.maximum(seen, 1.0)
    return out
