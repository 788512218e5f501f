"""Groups: the sets of parameter slices that must be removed together."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .reasons import Reason

__all__ = ["Group", "Member"]


@dataclass(frozen=True)
class Member:
    """One parameter dimension touched by a group.

    ``indices[k]`` is an index along ``dim`` of ``module.param``; ``units[k]`` is the group channel
    (0 .. group.size-1) it belongs to. A unit may own several indices (flatten, depthwise blocks).
    """

    module: str
    param: str
    dim: int
    indices: np.ndarray = field(repr=False, compare=False)
    units: np.ndarray = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.module}.{self.param}" if self.module else self.param

    def index_map(self) -> list[list[int]]:
        """For each group channel, the parameter indices along ``dim`` that go with it."""
        out: list[list[int]] = [[] for _ in range(int(self.units.max()) + 1 if self.units.size else 0)]
        for i, u in zip(self.indices.tolist(), self.units.tolist()):
            out[u].append(i)
        return out

    def __str__(self) -> str:
        per = len(self.indices) // max(1, len(np.unique(self.units)))
        extra = f" x{per}" if per > 1 else ""
        return f"{self.name}[dim {self.dim}]{extra}"


@dataclass
class Group:
    """A set of channels that must be removed together, across every layer that touches them."""

    id: int
    size: int
    prunable: bool
    reason: Reason | None
    reason_detail: str
    cross_channel: str  # "" when pruned == masked holds exactly; else what breaks it
    spaces: list[int] = field(repr=False)
    producers: list[str] = field(default_factory=list)  # modules whose outputs carry these channels
    _load_members: Callable[[], list[Member]] | None = field(default=None, repr=False, compare=False)
    _members: list[Member] | None = field(default=None, repr=False, compare=False)

    @property
    def members(self) -> list[Member]:
        """The parameter slices of the group (computed on first use)."""
        if self._members is None:
            self._members = self._load_members() if self._load_members is not None else []
        return self._members

    @property
    def why(self) -> str:
        """Human explanation for an unprunable group ("" when prunable)."""
        return self.reason.describe(self.reason_detail) if self.reason else ""

    @property
    def modules(self) -> list[str]:
        seen: dict[str, None] = {}
        for m in self.members:
            seen.setdefault(m.module)
        return list(seen)

    @property
    def label(self) -> str:
        """Short name: the first member's module, and how many more."""
        mods = self.modules
        return mods[0] + (f" (+{len(mods) - 1})" if len(mods) > 1 else "") if mods else f"group {self.id}"

    def __str__(self) -> str:
        state = "prunable" if self.prunable else f"not prunable: {self.why}"
        if self.prunable and self.cross_channel:
            state += f" (cross-channel: {self.cross_channel})"
        lines = [f"Group {self.id}: {self.size} channels, {state}"]
        lines += [f"  {m}" for m in self.members]
        return "\n".join(lines)
