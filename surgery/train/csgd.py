"""Centripetal SGD (Ding et al., CVPR 2019; seed 000): make the filters of a cluster identical during
training, then merge each cluster into one channel without changing the function.

1. **Clusters** (``cluster``): per prunable group, its channels are split into as many clusters as
   channels it keeps: k-means (scikit-learn) on the producers' filters flattened (every conv /
   linear writing the channels, concatenated: a residual stream shares one clustering across all its
   writers, which is what the paper's pacesetter/follower tables encode), or ``even`` contiguous
   blocks (the first ``size mod k`` clusters one larger). Clusters are sorted member lists; the first
   member is the one kept.
2. **Centripetal update** (``Centripetal.after_backward``): for every parameter the group carries on
   the producing side (producer kernels and biases, norm scales and shifts, depthwise filters: every
   member that is not a consumer's input slice), the gradient reshaped to ``(channels, -1)`` is
   replaced by ``G' = M G + D P`` with ``M`` the block-averaging matrix of the clusters and
   ``D = eta I + eps (I - M)`` (kernels) or ``eta_b I + 0.1 eps (I - M)`` (1-D vectors). Every member
   of a cluster then receives the cluster-mean gradient, and the differences between members decay
   by ``(1 - lr (eta + eps))`` per plain SGD step whatever the data. Weight decay lives in ``D``: the
   optimizer's own must be off for these parameters (``constrained_parameters``).
3. **Merge** (``merge_plan``): keep the first member of each cluster and add the removed members'
   input slices of every consumer into it: a 0/1 fold ``F[k, c] = 1`` for ``c`` in cluster ``k``.
   Exact when the members are identical (the kept channel then carries each member's activation).
   ``average=True`` (the safe option) first sets the kept member's producing parameters and BN
   statistics to the cluster mean, in a copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..dependency_graph import DependencyGraph, Group, Member
from ..methods.context import Scores
from ..plan import Plan
from ..planner import PlanOptions, build_plan
from ..roles import consumers, producers

__all__ = ["even_clusters", "kmeans_clusters", "cluster", "Centripetal", "merge_plan", "merge_matrix", "deviation"]

CSGD = "Ding et al., Centripetal SGD for Pruning Very Deep Convolutional Networks with Complicated Structure, CVPR 2019"


def even_clusters(size: int, k: int) -> list[np.ndarray]:
    """``k`` contiguous clusters of ``0..size-1``; the first ``size mod k`` get one more member.

    >>> [c.tolist() for c in even_clusters(7, 3)]
    [[0, 1, 2], [3, 4], [5, 6]]
    """
    base, extra = divmod(size, k)
    out, start = [], 0
    for i in range(k):
        n = base + (1 if i < extra else 0)
        out.append(np.arange(start, start + n))
        start += n
    return out


def kmeans_clusters(features: np.ndarray, k: int, seed: int = 0) -> list[np.ndarray]:
    """k-means on the rows of ``features``; clusters as sorted index arrays, ordered by first member."""
    from sklearn.cluster import KMeans

    if k >= len(features):
        return [np.array([i]) for i in range(len(features))]
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(features).labels_
    clusters = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    return sorted(clusters, key=lambda c: int(c[0]))


def _param(root: nn.Module, m: Member) -> torch.Tensor:
    owner = root.get_submodule(m.module) if m.module else root
    return getattr(owner, m.param)


def _features(graph: DependencyGraph, group: Group) -> np.ndarray:
    """One row per channel: the producers' filters flattened and concatenated."""
    rows = []
    for _, m in producers(graph, group):
        w = _param(graph.root, m).detach().double()
        moved = w.movedim(m.dim, 0)
        per_unit = np.zeros((group.size, moved[0].numel() * int(np.bincount(m.units).max())))
        for u, idx in enumerate(m.index_map()):
            if idx:
                flat = moved[torch.tensor(idx)].reshape(-1).numpy()
                per_unit[u, : flat.size] = flat
        rows.append(per_unit)
    if not rows:
        raise ValueError(f"group {group.id} has no conv / linear producer to cluster by")
    return np.concatenate(rows, axis=1)


def cluster(graph: DependencyGraph, groups: list[Group], keep: dict[int, int], how: str = "kmeans",
            seed: int = 0) -> dict[int, list[np.ndarray]]:
    """``{group id: clusters}`` with ``keep[gid]`` clusters per group (``how``: kmeans or even)."""
    out = {}
    for g in groups:
        k = int(keep[g.id])
        if not 1 <= k <= g.size:
            raise ValueError(f"group {g.id} of {g.size} channels cannot keep {k}")
        out[g.id] = even_clusters(g.size, k) if how == "even" else kmeans_clusters(_features(graph, g), k, seed)
    return out


def merge_matrix(size: int, clusters: list[np.ndarray]) -> np.ndarray:
    """``M[i, j] = 1/|H|`` when channels i and j share cluster H (identity for singletons)."""
    m = np.zeros((size, size))
    for c in clusters:
        m[np.ix_(c, c)] = 1.0 / len(c)
    return m


@dataclass
class _Constraint:
    owner: str
    name: str
    dim: int
    merge: torch.Tensor  # (n, n) over the parameter's indices along dim
    vector: bool


def _index_merge(member: Member, clusters: list[np.ndarray], n: int) -> np.ndarray:
    """Merge matrix over a member's own indices: index i and j are tied when their channels share a
    cluster and they sit at the same position inside their channel's block (flatten, depthwise)."""
    of_unit = {u: np.flatnonzero(member.units == u) for u in np.unique(member.units)}
    m = np.eye(n)
    for c in clusters:
        blocks = [member.indices[of_unit[u]] for u in c if u in of_unit]
        if len(blocks) < 2:
            continue
        for pos in range(len(blocks[0])):
            idx = np.array([b[pos] for b in blocks])
            m[np.ix_(idx, idx)] = 1.0 / len(idx)
    return m


def constrained_members(graph: DependencyGraph, group: Group) -> list[Member]:
    """Every parameter slice of the group on the producing side (not a consumer's input slice)."""
    skip = {(s.owner, s.weight, m.dim) for s, m in consumers(graph, group)}
    params = {n for n, _ in graph.root.named_parameters()}
    return [m for m in group.members if (m.module, m.param, m.dim) not in skip
            and (f"{m.module}.{m.param}" if m.module else m.param) in params]


class Centripetal:
    """The gradient rewrite of C-SGD for ``clusters`` (``{group id: clusters}``) of ``graph``.

    Use ``after_backward(model)`` between ``loss.backward()`` and ``optimizer.step()``; the model is
    the traced one (``graph.root``) or one with the same parameter names.
    """

    def __init__(self, graph: DependencyGraph, clusters: dict[int, list[np.ndarray]], eps: float = 3e-3,
                 weight_decay: float = 1e-4, bias_decay: float = 0.0, vector_ratio: float = 0.1):
        self.eps, self.eta, self.eta_b, self.vector_ratio = eps, weight_decay, bias_decay, vector_ratio
        self.constraints: list[_Constraint] = []
        for gid, cl in clusters.items():
            for m in constrained_members(graph, graph.groups[gid]):
                t = _param(graph.root, m)
                n = t.shape[m.dim]
                self.constraints.append(_Constraint(m.module, m.param, m.dim, torch.from_numpy(_index_merge(m, cl, n)),
                                                    t.dim() == 1))

    def parameter_names(self) -> set[str]:
        """Qualified names of the constrained parameters (their optimizer weight decay must be 0)."""
        return {f"{c.owner}.{c.name}" if c.owner else c.name for c in self.constraints}

    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        for c in self.constraints:
            p = getattr(model.get_submodule(c.owner) if c.owner else model, c.name)
            if p.grad is None:
                continue
            m = c.merge.to(p.dtype)
            eye = torch.eye(m.shape[0], dtype=p.dtype)
            eta = self.eta_b if c.vector else self.eta
            strength = self.eps * (self.vector_ratio if c.vector else 1.0)
            decay = eta * eye + strength * (eye - m)
            g = p.grad.movedim(c.dim, 0).reshape(m.shape[0], -1)
            w = p.detach().movedim(c.dim, 0).reshape(m.shape[0], -1)
            new = (m @ g + decay @ w).reshape(p.grad.movedim(c.dim, 0).shape).movedim(0, c.dim)
            p.grad.copy_(new)


def deviation(model: nn.Module, graph: DependencyGraph, clusters: dict[int, list[np.ndarray]]) -> float:
    """Sum over clusters of ||F_j - mean||^2 over the producers' filters (the paper's chi)."""
    total = 0.0
    for gid, cl in clusters.items():
        for _, m in producers(graph, graph.groups[gid]):
            w = getattr(model.get_submodule(m.module) if m.module else model, m.param).detach().double().movedim(m.dim, 0)
            for c in cl:
                idx = [i for u in c for i in m.index_map()[u]] if len(c) > 1 else []
                if idx:
                    rows = w[torch.tensor(idx)].reshape(len(idx), -1)
                    total += float(((rows - rows.mean(0)) ** 2).sum())
    return total


def merge_plan(model: nn.Module, graph: DependencyGraph, clusters: dict[int, list[np.ndarray]], *,
               average: bool = False) -> tuple[nn.Module, Plan]:
    """``(model to apply the plan to, plan)``: each cluster keeps its first member, the others' consumer
    input slices are summed into it (0/1 fold). With ``average`` the kept member's producing
    parameters and statistics become the cluster mean first (in a copy; ``model`` is not modified)."""
    target = model
    if average:
        target = copy.deepcopy(model)
        with torch.no_grad():
            for gid, cl in clusters.items():
                g = graph.groups[gid]
                skip = {(s.owner, s.weight, m.dim) for s, m in consumers(graph, g)}
                for m in g.members:
                    if (m.module, m.param, m.dim) in skip:
                        continue
                    t = getattr(target.get_submodule(m.module) if m.module else target, m.param, None)
                    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                        continue
                    moved = t.movedim(m.dim, 0)
                    imap = m.index_map()
                    for c in cl:
                        blocks = [imap[u] for u in c if u < len(imap) and imap[u]]
                        if len(blocks) > 1:
                            for pos in range(len(blocks[0])):
                                idx = torch.tensor([b[pos] for b in blocks])
                                moved[blocks[0][pos]] = moved[idx].mean(0)
    folds: dict[int, np.ndarray] = {}
    removed: dict[int, np.ndarray] = {}
    for gid, cl in clusters.items():
        size = graph.groups[gid].size
        if len(cl) == size:
            continue
        fold = np.zeros((len(cl), size))
        for k, c in enumerate(cl):
            fold[k, c] = 1.0
        folds[gid] = fold
        removed[gid] = np.setdiff1d(np.arange(size), [int(c[0]) for c in cl])
    plan = build_plan(graph, "csgd", 0.0, "clusters", PlanOptions(), {"average": average},
                      Scores({}, fold=lambda gid, keep: folds[gid]), removed, ())
    return target, plan
