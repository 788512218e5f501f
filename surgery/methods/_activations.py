"""Where data-driven methods observe a group's channels, and per-channel reductions of those tensors.

A group's channels are observed where they are *used*: at the input of every conv (``groups == 1``)
or linear that contracts over them (:func:`surgery.roles.consumers`). That tensor is what the
consumers read after the norm, the nonlinearity and any pooling, and zeroing a channel there is
exactly what removing it does to its consumers. Each entry of the tensor along its channel dim is
mapped to the group channel it carries by :func:`surgery.roles.observation_units` (``-1``: another
group's channel). A ``flatten -> linear`` consumer reads each channel over several entries (its
``H x W`` positions); these count as positions of that channel, like the spatial positions of a conv
input. Dim 0 is taken as the sample dim (unless the channel dim is 0, an unbatched call).

When several consumers read the same tensor it is observed once; a group read at several tensors (a
residual stream read by every block) is observed at all of them and each method says how it
combines them. A group that no conv / linear reads, or with channels that reach none, is left whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..calibration import record
from ..dependency_graph import DependencyGraph, Group
from ..roles import consumers, observation_units
from .context import ScoreContext

__all__ = ["Observation", "observations", "plan_observations", "observe", "flat", "channel_sum", "NO_CONSUMER"]

NO_CONSUMER = "no conv or linear reads these channels: there is no activation to observe"


@dataclass(frozen=True)
class Observation:
    """One tensor at which a group's channels are observed.

    ``index``: the entries along ``dim`` that carry group channels; ``units``: the channel of each.
    """

    node: str  # fx node whose value is observed (a consumer's input)
    dim: int  # channel dim of that value (non-negative)
    index: torch.Tensor  # int64, entries along ``dim`` that belong to the group
    units: torch.Tensor  # int64, their group channels
    size: int  # group size

    @property
    def batched(self) -> bool:
        return self.dim > 0

    def observed(self) -> np.ndarray:
        """Boolean per group channel: read at this tensor."""
        out = np.zeros(self.size, dtype=bool)
        out[self.units.numpy()] = True
        return out

    def entries(self, positions: int) -> torch.Tensor:
        """Per group channel, how many values of one sample carry it (``positions`` x its entries)."""
        return torch.bincount(self.units, minlength=self.size).double() * positions


def observations(graph: DependencyGraph, group: Group) -> list[Observation]:
    """The distinct consumer inputs at which ``group``'s channels are read."""
    out: dict[tuple[str, int], Observation] = {}
    for site, _ in consumers(graph, group):
        value = graph.gm_node(site.input).meta.get("val")
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        # conv: (N, C, *spatial) or unbatched (C, *spatial); linear: (..., C)
        dim = value.dim() - len(site.stride) - 1 if site.kind == "conv" else value.dim() - 1
        if dim < 0 or (site.input, dim) in out:
            continue
        units = observation_units(graph, group, site.input, dim)
        index = np.flatnonzero(units >= 0)
        if index.size == 0:
            continue
        out[(site.input, dim)] = Observation(site.input, dim, torch.from_numpy(index).long(),
                                             torch.from_numpy(units[index]).long(), group.size)
    return list(out.values())


def plan_observations(ctx: ScoreContext) -> tuple[dict[int, list[Observation]], dict[int, str]]:
    """Observations of every group of ``ctx``, and the groups left whole with the reason."""
    plan, skipped = {}, {}
    for g in ctx.groups:
        obs = observations(ctx.graph, g)
        if not obs:
            skipped[g.id] = NO_CONSUMER
            continue
        seen = np.logical_or.reduce([o.observed() for o in obs])
        if not seen.all():
            missing = np.flatnonzero(~seen)
            shown = ", ".join(map(str, missing[:8].tolist())) + (", ..." if missing.size > 8 else "")
            skipped[g.id] = f"channels {shown} reach no conv or linear input: their activation cannot be observed"
            continue
        plan[g.id] = obs
    return plan, skipped


def flat(a: torch.Tensor, obs: Observation) -> torch.Tensor:
    """``a`` as (samples, positions, entries of the group): the group's entries along ``obs.dim`` last."""
    a = a.movedim(obs.dim, -1)
    a = a.reshape(a.shape[0] if obs.batched else 1, -1, a.shape[-1])
    return a.index_select(2, obs.index.to(a.device))


def channel_sum(t: torch.Tensor, obs: Observation) -> torch.Tensor:
    """(samples, positions, entries) -> (samples, group size): sum of each channel's values."""
    per_entry = t.sum(1)
    out = torch.zeros(per_entry.shape[0], obs.size, dtype=per_entry.dtype, device=per_entry.device)
    return out.index_add_(1, obs.units.to(per_entry.device), per_entry)


Visit = Callable[[int, int, Observation, torch.Tensor, "torch.Tensor | None"], None]


def observe(ctx: ScoreContext, plan: dict[int, list[Observation]], visit: Visit, *, grad: bool = False,
            loss: Callable | None = None, after_batch: Callable[[], None] | None = None) -> int:
    """Run the calibration data once and call ``visit(gid, k, obs, activation, gradient)`` for the k-th
    observation of every planned group, batch after batch (then ``after_batch()``). ``activation`` /
    ``gradient`` are :func:`flat` views (float64); ``gradient`` is ``None`` unless ``grad``. Returns
    the batch count."""
    watch = {o.node for obs in plan.values() for o in obs}
    if not watch:
        return 0  # no group to observe: do not run the data (record's grad would have nothing to differentiate)

    def each_batch(acts, grads, labels):
        for gid, obs in plan.items():
            for k, o in enumerate(obs):
                a = acts.get(o.node)
                if a is None:
                    continue
                g = None
                if grad:
                    g = grads.get(o.node) if grads is not None else None
                    g = flat(g, o).double() if g is not None else torch.zeros_like(flat(a, o), dtype=torch.float64)
                visit(gid, k, o, flat(a, o).double(), g)
        if after_batch is not None:
            after_batch()

    return record(ctx.graph, ctx.calibration, watch, each_batch, grad=grad, loss=loss, progress=ctx.progress)
