"""How much of a model pruning can reach, and what blocks the rest.

A parameter tensor is *reachable* when one of its dims carries channels of a prunable group (it can
shrink). ``coverage(graph)`` returns the share of parameter elements in reachable tensors and, for
the rest, what blocks them: grouped by the reason and the op named in it, with counts.

Examples
--------
>>> import torch, surgery
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
>>> cov = coverage(surgery.trace(net, torch.randn(1, 3, 16, 16)))
>>> cov.params, cov.prunable_params, round(cov.share, 3)   # the last bias is sized by the output
(516, 512, 0.992)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .dependency_graph import DependencyGraph

__all__ = ["Blocker", "Coverage", "coverage"]


@dataclass(frozen=True)
class Blocker:
    reason: str  # Reason name
    op: str  # the op (or input/output) named in the reason
    groups: int  # unprunable groups (of 2+ channels) with this reason and op
    params: int  # parameter elements in tensors that no prunable group reaches, blocked here


@dataclass(frozen=True)
class Coverage:
    params: int
    prunable_params: int
    blockers: tuple[Blocker, ...] = field(default=())

    @property
    def share(self) -> float:
        return self.prunable_params / self.params if self.params else 0.0

    def as_dict(self) -> dict:
        return {"params": self.params, "prunable_params": self.prunable_params, "share": self.share,
                "blockers": [b.__dict__ for b in self.blockers]}


def _op_of(group) -> str:
    """The op named in an unprunable group's reason: ``a[dim 1] (cumsum (cumsum_1))`` -> ``cumsum``."""
    if group.reason is not None and group.reason.name in ("MODEL_INPUT", "MODEL_OUTPUT"):
        return "model input" if group.reason.name == "MODEL_INPUT" else "model output"
    detail = group.reason_detail or ""
    _, sep, why = detail.partition(" (")
    why = why[:-1] if sep and why.endswith(")") else detail
    return why.split(" (")[0].strip() or "?"


def coverage(graph: DependencyGraph) -> Coverage:
    """Share of parameters reachable by pruning, and what blocks the rest (see module docstring)."""
    t = graph.table
    comp_group = graph._comp.comp_group
    prunable = np.array([g.prunable for g in graph.groups] + [False], dtype=bool)
    by_tensor: dict[tuple[str, str], list[int]] = {}
    for (owner, name, dim), sid in t.param_spaces().items():
        by_tensor.setdefault((owner, name), []).append(sid)
    total = reached = 0
    blocked: dict[tuple[str, str], list[int]] = {}  # (reason, op) -> [groups, params]
    seen_groups: set[tuple[int, str, str]] = set()
    params = dict(graph.root.named_parameters(remove_duplicate=True))
    for (owner, name), sids in by_tensor.items():
        tensor = params.get(f"{owner}.{name}" if owner else name)
        if tensor is None:
            continue  # a buffer, or a tied parameter counted under its first name
        n = tensor.numel()
        total += n
        groups = set()
        for sid in sids:
            s = t.spaces[sid]
            g = comp_group[graph.atom_comp[s.offset : s.offset + s.size]]
            groups.update(int(x) for x in np.unique(g) if x >= 0)
        if any(prunable[g] for g in groups):
            reached += n
            continue
        blockers = [graph.groups[g] for g in sorted(groups) if graph.groups[g].size > 1 and graph.groups[g].reason is not None]
        if not blockers:
            key = ("SINGLE_CHANNEL", "only one-channel dims")
            blocked.setdefault(key, [0, 0])[1] += n
            continue
        g0 = max(blockers, key=lambda g: g.size)
        key = (g0.reason.name, _op_of(g0))
        entry = blocked.setdefault(key, [0, 0])
        entry[1] += n
        for g in blockers:
            k = (g.id, *key)
            if k not in seen_groups and (g.reason.name, _op_of(g)) == key:
                seen_groups.add(k)
                entry[0] += 1
    rows = tuple(sorted((Blocker(r, op, c[0], c[1]) for (r, op), c in blocked.items()), key=lambda b: -b.params))
    return Coverage(total, reached, rows)
