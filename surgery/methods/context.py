"""What a method receives (:class:`ScoreContext`) and may return (:class:`Scores`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..calibration import Calibration
from ..dependency_graph import DependencyGraph, Group, Member

__all__ = ["ScoreContext", "Scores", "member_tensor", "member_reduce", "reading_weights"]

#: the lazy weight source (``surgery._lazy_weights.LazyWeights``) of the method being run, if any
_SOURCE: ContextVar = ContextVar("surgery_lazy_weights", default=None)


@contextmanager
def reading_weights(source) -> Iterator[None]:
    """While active, :func:`member_tensor` answers a lookup of a meta tensor of ``source``'s model
    with the value ``source.get(name, meta_tensor)`` reads from the checkpoint. A context variable,
    not an argument, so every method reading weights through ``member_tensor`` / ``member_reduce`` /
    ``ScoreContext.tensor`` gets the values without knowing where they come from."""
    token = _SOURCE.set(source)
    try:
        yield
    finally:
        _SOURCE.reset(token)


@dataclass
class Scores:
    """A method's answer.

    ``scores[gid]``: one value per channel, higher = more important. A prunable group missing from
    ``scores`` is left whole; ``skipped[gid]`` says why (e.g. "no conv produces these channels").
    ``fold(gid, keep)``, when given, returns the (kept x size) matrix applied to the consumers' input
    slices of the group for that selection, or ``None`` for no fold.
    """

    scores: dict[int, np.ndarray]
    skipped: dict[int, str] = field(default_factory=dict)
    fold: Callable[[int, np.ndarray], "np.ndarray | None"] | None = None
    #: bias compensation: ``shift[gid][c]`` is channel c's mean at its consumers' (linear) input (a tuple: one per column);
    #: the removed channels' means go into the consumers' biases (see ``GroupPlan.shift``)
    shift: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass
class ScoreContext:
    """The model (never modified), its dependency graph, the prunable groups to score, and the
    calibration data / loss for data-driven methods."""

    model: nn.Module
    graph: DependencyGraph
    groups: list[Group]
    calibration: Calibration | None = None
    loss: Callable | None = None
    progress: Callable[[str], None] | None = None

    def tensor(self, owner: str, name: str) -> torch.Tensor | None:
        return member_tensor(self.graph.root, owner, name)


def member_tensor(model: nn.Module, owner: str, name: str) -> torch.Tensor | None:
    """Tensor ``name`` of submodule ``owner`` of ``model`` (None if absent); a meta tensor is read
    from the active lazy source (:func:`reading_weights`) when that source maps ``model``'s names."""
    try:
        mod = model.get_submodule(owner) if owner else model
    except AttributeError:
        return None
    t = getattr(mod, name, None)
    if not isinstance(t, torch.Tensor):
        return None
    source = _SOURCE.get()
    if t.is_meta and source is not None and source.covers(model):
        return source.get(f"{owner}.{name}" if owner else name, t)
    return t


def member_reduce(model: nn.Module, group: Group, reduce: Callable, params_only: bool = True,
                  members: list[Member] | None = None) -> np.ndarray:
    """Sum over ``members`` (default: all of the group's) of ``reduce(tensor, other_dims)`` scattered
    onto group channels.

    ``reduce`` maps a parameter to a 1-D tensor along the member's dim (e.g. the L1 norm of each slice).
    """
    total = np.zeros(group.size, dtype=np.float64)
    with torch.no_grad():
        for m in group.members if members is None else members:
            mod = model.get_submodule(m.module) if m.module else model
            if params_only and m.param not in dict(mod.named_parameters(recurse=False)):
                continue
            t = member_tensor(model, m.module, m.param)
            if t is None or not t.is_floating_point():
                continue
            dims = [d for d in range(t.dim()) if d != m.dim]
            per_index = reduce(t.detach().float(), dims).cpu().double().numpy()
            np.add.at(total, m.units, per_index[m.indices])
    return total
