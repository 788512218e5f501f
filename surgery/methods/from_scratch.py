"""Pruning from Scratch (Wang et al., AAAI 2020; seed 002), following the authors' code.

Per-channel gates (initialised to 1) are placed after each scored group's BatchNorm layers and before
their activation: ``y = act(g * BN(conv(x)))``. On a copy of the model whose weights are frozen, only
the gates train (Adam, ``lr`` 0.01), in train mode (BN uses batch statistics), with the loss
``CE + lambda * (mean |g| - r)^2`` over all gate entries of all groups (``lambda`` 0.5, ``r`` 0.2:
the CIFAR defaults); after every step the gates are clamped to ``[0, 1]``. The learned gates are the
scores: pruning ranks them globally with no normalisation (``normalize="none"``), and
``target_macs`` bisects for the plan whose MACs are closest to the budget, measured against the
model as given (the paper's reference is the original width). The seed note's own gradient line is
a no-op; the regulariser here goes through autograd (its gradient is
``2 lambda (mean|g| - r) sign(g) / N``).

The paper then re-initialises the pruned architecture and trains it from scratch; with
``fold_gates`` the kept channels' gate values are folded into their consumers instead (exact when
the activation after the gate is positively homogeneous, as ReLU is), so the pruned model computes
what the gated one computes.
``scope="inner"`` (default, as in the paper) gates groups with one producing layer; ``"all"`` also
gates residual streams.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..calibration.recorder import default_loss
from ..dependency_graph import Group
from ..roles import norm_members, producers
from ._registry import Option, register_method
from .context import ScoreContext, Scores

__all__ = ["GateSet", "regulariser", "from_scratch"]

PFS = "Wang, Zhang, Wang, Wang, Cao, Pruning from Scratch, AAAI 2020"


class GateSet(nn.Module):
    """Gates of several groups, applied by forward hooks on the groups' norm layers of ``model``."""

    def __init__(self, model: nn.Module, groups: list[Group]):
        super().__init__()
        self.gates = nn.ParameterDict({str(g.id): nn.Parameter(torch.ones(g.size)) for g in groups})
        self.handles = []
        for g in groups:
            for m in norm_members(model, g):
                layer = model.get_submodule(m.module)
                order = torch.full((layer.weight.shape[0],), -1, dtype=torch.long)
                order[torch.as_tensor(m.indices)] = torch.as_tensor(m.units)
                self.handles.append(layer.register_forward_hook(self._hook(str(g.id), order)))

    def _hook(self, key: str, order: torch.Tensor):
        def apply(module, args, out):
            gate = self.gates[key][order.clamp_min(0)] * (order >= 0) + (order < 0)
            return out * gate.view(1, -1, *([1] * (out.dim() - 2)))

        return apply

    def all(self) -> torch.Tensor:
        return torch.cat([g.reshape(-1) for g in self.gates.values()])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def regulariser(gates: torch.Tensor, lam: float, r: float) -> torch.Tensor:
    """``lambda * (mean |g| - r)^2`` over every gate entry."""
    return lam * (gates.abs().mean() - r) ** 2


def _gated_groups(ctx: ScoreContext, scope: str) -> tuple[list[Group], dict[int, str]]:
    chosen, skipped = [], {}
    for g in ctx.groups:
        if not norm_members(ctx.graph.root, g):
            skipped[g.id] = "no BatchNorm on these channels to place a gate after"
        elif scope == "inner" and len(producers(ctx.graph, g)) != 1:
            skipped[g.id] = "several layers produce these channels (a residual stream); scope='all' gates them too"
        else:
            chosen.append(g)
    return chosen, skipped


@register_method(
    "from-scratch", "channel gates learned on the frozen network (Pruning from Scratch)", paper=PFS,
    needs=("data", "labels"), normalize="none",
    options=(
        Option("epochs", int, 10, "passes over the calibration data", low=1),
        Option("lr", float, 0.01, "Adam learning rate of the gates", low=0.0),
        Option("lam", float, 0.5, "weight of the sparsity regulariser (lambda)", low=0.0),
        Option("r", float, 0.2, "target mean gate value (sparsity level)", low=0.0, high=1.0),
        Option("scope", str, "inner", "'inner': groups with one producing layer (as the paper); 'all'", choices=("inner", "all")),
        Option("fold_gates", bool, False, "fold the kept gates into the consumers (exact for ReLU) instead of dropping them"),
        Option("seed", int, 0, "seed of the batch order"),
    ),
)
def from_scratch(ctx: ScoreContext, epochs: int, lr: float, lam: float, r: float, scope: str, fold_gates: bool, seed: int):
    """Learn gates on a frozen copy of the model; the gate values are the scores."""
    groups, skipped = _gated_groups(ctx, scope)
    if not groups:
        return Scores({}, skipped)
    model = copy.deepcopy(ctx.graph.root)
    for p in model.parameters():
        p.requires_grad_(False)
    gates = GateSet(model, groups)
    opt = torch.optim.Adam(gates.parameters(), lr=lr)
    loss_fn = ctx.loss or default_loss
    batches = list(ctx.calibration)
    rng = np.random.default_rng(seed)
    model.train()
    for epoch in range(epochs):
        for i in rng.permutation(len(batches)):
            inputs, labels = batches[i]
            if ctx.progress is not None:
                ctx.progress(f"learning gates: epoch {epoch + 1}/{epochs}")
            loss = loss_fn(model(*inputs), labels) + regulariser(gates.all(), lam, r)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for g in gates.gates.values():
                    g.clamp_(0.0, 1.0)
    gates.remove()
    values = {int(k): v.detach().double().numpy() for k, v in gates.gates.items()}

    def fold(gid: int, keep: np.ndarray):
        if not fold_gates or gid not in values:
            return None
        f = np.zeros((len(keep), len(values[gid])))
        f[np.arange(len(keep)), keep] = values[gid][keep]
        return f

    return Scores(values, skipped, fold)
