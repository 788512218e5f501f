"""First-order Taylor criterion (Molchanov, Tyree, Karras, Aila, Kautz, "Pruning Convolutional Neural
Networks for Resource Efficient Inference", ICLR 2017).

For a feature map ``z`` of channel ``c`` with M positions and the gradient ``g = dL/dz`` of the loss,
the first-order estimate of the loss change when the map is zeroed is, per example,
``Theta_n = | (1/M) * sum_m z_m * g_m |``. Theta is averaged over the calibration examples, then
normalised per group (the paper's per-layer L2 normalisation) ``Theta / sqrt(sum_c Theta_c^2)`` so
that the global policy can compare groups directly (``normalize="none"``); a group whose Theta is all
zero keeps zero scores. A channel whose activation is always zero scores exactly 0.

The |.| sits outside the spatial mean and inside the sample mean, as in the paper (NVlabs' code
takes |z*g| before averaging; jacobgil's takes it after averaging over the batch).

Where the activation is observed: at the input of each conv / linear that reads the group's channels
(:mod:`surgery.methods._activations`), after BatchNorm, ReLU and any pooling. Zeroing a channel there
is exactly what removing it does to its consumers, so for a loss linear in those activations
``M * Theta_n`` *is* the loss change of pruning the channel for example n. For a ``flatten -> linear``
consumer the M positions of a channel are its entries in the flattened vector. A group read at
several tensors (a residual stream) sums, per example, the signed ``(1/M) sum z*g`` of every tensor
before taking |.|; gradients are total derivatives, so paths that run from one of these tensors to
another are counted at both (a first-order approximation for residual streams).

Gradients come from :func:`surgery.calibration.record` (``torch.autograd.grad`` with respect to the
activations only: no parameter's ``.grad`` is touched, the model is not changed, BatchNorm in eval
mode). Loss: ``loss(outputs, labels)`` when given, else the **summed** cross-entropy over the batch,
so that each example's gradient is its own (a mean-reduced loss scales every batch by 1 / batch size).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..calibration.recorder import default_loss
from ..errors import PlanError
from ._activations import Observation, channel_sum, observe, plan_observations
from ._registry import register_method
from .context import ScoreContext, Scores

PAPER = "Molchanov et al., Pruning Convolutional Neural Networks for Resource Efficient Inference, ICLR 2017"


def summed_cross_entropy(outputs, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the batch: the gradient for each example is that example's own."""
    return default_loss(outputs, labels) * labels.shape[0]


def taylor_raw(ctx: ScoreContext, loss: Callable | None = None) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Unnormalised Theta per observable group (``{gid: per-channel mean over examples}``) and the
    skipped groups. ``loss`` defaults to ``ctx.loss``, else the summed cross-entropy."""
    loss = loss or ctx.loss
    if loss is None and ctx.calibration is not None and not ctx.calibration.has_labels:
        raise PlanError("method 'taylor' needs labels with the calibration data ((x, y) pairs) or loss=...")
    plan, skipped = plan_observations(ctx)
    total = {gid: torch.zeros(obs[0].size, dtype=torch.float64) for gid, obs in plan.items()}
    count = {gid: 0 for gid in plan}
    batch: dict[int, torch.Tensor] = {}

    def visit(gid: int, k: int, o: Observation, a: torch.Tensor, g: torch.Tensor):
        signed = (channel_sum(a * g, o) / o.entries(a.shape[1]).clamp_min(1.0).to(a.device)).cpu()  # (n, size): (1/M) sum z*g
        batch[gid] = batch[gid] + signed if gid in batch else signed

    def after_batch():
        for gid, signed in batch.items():
            total[gid] += signed.abs().sum(0)
            count[gid] += signed.shape[0]
        batch.clear()

    observe(ctx, plan, visit, grad=True, loss=loss or summed_cross_entropy, after_batch=after_batch)
    return {gid: (total[gid] / max(count[gid], 1)).numpy() for gid in plan}, skipped


def layer_normalize(theta: np.ndarray) -> np.ndarray:
    """``theta / ||theta||_2`` (zeros stay zeros)."""
    norm = float(np.sqrt(np.square(theta).sum()))
    return theta / norm if norm > 0 else np.zeros_like(theta)


@register_method("taylor", "first-order Taylor estimate |mean(activation x gradient)| of the loss change, L2-normalised per group",
                 paper=PAPER, needs=("data", "labels"), normalize="none")
def taylor(ctx: ScoreContext):
    """Score = Theta / ||Theta||_2 per group, Theta = mean over examples of |(1/M) sum_m z_m dL/dz_m|."""
    raw, skipped = taylor_raw(ctx)
    return Scores({gid: layer_normalize(t) for gid, t in raw.items()}, skipped)
