"""Build the channel-dependency graph of a traced model and derive its groups.

Building is one pass over the fx nodes (each op rule adds numpy couplings), then the solve: spaces
coupled atom for atom are merged into classes (a ``connected_components`` over spaces), and one
``scipy.sparse.csgraph.connected_components`` over the representative atoms of the classes gives the
units; signatures and groups are computed on those atoms too. Linear in the size of the model.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch
import torch.fx
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn

from .coupling import couple_node
from .group import Group, Member
from .reasons import Reason
from .spaces import SpaceTable
from .tracing import Traced, normalize_inputs, trace_graph

__all__ = ["DependencyGraph", "build_graph", "trace"]


def _unique_sorted(a: np.ndarray) -> np.ndarray:
    """Sorted unique values (a plain sort: numpy's hash-based unique is slower on millions of ints)."""
    a = np.sort(a)
    return a[np.r_[True, a[1:] != a[:-1]]] if a.size else a


@dataclass
class _Components:
    atom_comp: np.ndarray  # atom -> component (unit candidate)
    comp_group: np.ndarray  # component -> group id or -1
    comp_unit: np.ndarray  # component -> index inside its group or -1


@dataclass
class _Classes:
    """Spaces coupled atom for atom, merged (``DependencyGraph._components``)."""

    rep: np.ndarray  # space -> its class's first space
    reps: np.ndarray  # the first spaces, ascending: their atoms are the representative atoms, in order
    labels: np.ndarray  # representative atom -> component
    original: np.ndarray  # representative atom -> its global atom id in its first space


class DependencyGraph:
    """Channel spaces of a traced model, their couplings, and the resulting groups."""

    def __init__(self, traced: Traced, table: SpaceTable, example_inputs: tuple):
        self.traced = traced
        self.root = traced.root
        self.fx_graph = traced.graph
        self.frontend = traced.frontend
        self.table = table
        self.example_inputs = example_inputs
        self._nodes = {n.name: n for n in traced.graph.nodes}
        self._solve()

    @functools.cached_property
    def gm(self) -> torch.fx.GraphModule:
        """The traced model as a ``GraphModule`` (shares submodules with the user's model)."""
        return self.traced.to_graph_module()

    # -- construction -----------------------------------------------------------------------
    def _solve(self) -> None:
        t = self.table
        ns = len(t.spaces)
        ncomp, atom_comp, rc = self._components()
        sizes = np.array([s.size for s in t.spaces], dtype=np.int64)

        stop_space = np.full(ncomp, -1, dtype=np.int64)
        for sid in sorted(t.stops):
            comps = atom_comp[self.table.atoms(sid)]
            fresh = comps[stop_space[comps] < 0]
            stop_space[fresh] = sid
        cross_space = np.full(ncomp, -1, dtype=np.int64)
        for sid in sorted(t.cross):
            cross_space[atom_comp[self.table.atoms(sid)]] = sid

        # Work on representative atoms (one per class of identical spaces, see _components): a
        # component touches every space of a class or none, so (component, class) pairs stand for
        # (component, space) pairs; a class is named by its first (smallest) space id.
        is_param = np.zeros(ns, dtype=bool)
        is_param[[s.id for s in t.spaces if s.kind == "param"]] = True
        class_param = np.zeros(ns, dtype=bool)
        np.logical_or.at(class_param, rc.rep, is_param)
        rng = np.random.default_rng(0)
        space_hash = rng.integers(1, 2**62, size=ns, dtype=np.int64)
        class_hash = np.zeros(ns, dtype=np.int64)
        np.bitwise_xor.at(class_hash, rc.rep, space_hash)
        rep_atom_class = np.repeat(rc.reps, sizes[rc.reps])  # class of every representative atom
        comp_has_param = np.zeros(ncomp, dtype=bool)
        comp_has_param[rc.labels[class_param[rep_atom_class]]] = True

        # Signature of a component = the set of spaces it touches; components with the same
        # signature form one group (one "layer's channels").
        cand = comp_has_param[rc.labels]
        keys = _unique_sorted(rc.labels[cand] * ns + rep_atom_class[cand])
        kc, ks = keys // ns, keys % ns
        starts = np.flatnonzero(np.r_[True, kc[1:] != kc[:-1]]) if kc.size else np.zeros(0, np.int64)
        comps = kc[starts]
        sig = np.bitwise_xor.reduceat(class_hash[ks], starts) if keys.size else np.zeros(0, np.int64)
        first_space = ks[starts]  # smallest space id of each component
        # first atom of each component orders units inside a group (a class's first space holds the
        # smallest atom ids of the class)
        first_atom = np.full(ncomp, t.n_atoms, dtype=np.int64)
        np.minimum.at(first_atom, rc.labels, rc.original)

        uniq_sig, sig_idx = np.unique(sig, return_inverse=True)
        order = np.lexsort((first_atom[comps], first_space, sig_idx))
        comp_group = np.full(ncomp, -1, dtype=np.int64)
        comp_unit = np.full(ncomp, -1, dtype=np.int64)
        # groups numbered by their first space (topological order), then signature
        group_first = np.full(uniq_sig.size, np.iinfo(np.int64).max)
        np.minimum.at(group_first, sig_idx, first_space)
        group_order = np.argsort(group_first, kind="stable")
        group_rank = np.empty_like(group_order)
        group_rank[group_order] = np.arange(group_order.size)
        gids = group_rank[sig_idx[order]]
        ordered = comps[order]
        comp_group[ordered] = gids
        sorted_by_gid = np.argsort(gids, kind="stable")
        ordered, gids_sorted = ordered[sorted_by_gid], gids[sorted_by_gid]
        gstart = np.flatnonzero(np.r_[True, gids_sorted[1:] != gids_sorted[:-1]]) if gids.size else np.zeros(0, int)
        pos = np.arange(ordered.size) - np.repeat(gstart, np.diff(np.r_[gstart, ordered.size]))
        comp_unit[ordered] = pos
        self._comp = _Components(atom_comp, comp_group, comp_unit)

        # group -> spaces (every space of each class the group's components touch)
        members: dict[int, list[int]] = {}
        for sid, r in enumerate(rc.rep.tolist()):
            members.setdefault(r, []).append(sid)
        group_spaces: list[list[int]] = [[] for _ in range(uniq_sig.size)]
        gs = _unique_sorted(comp_group[kc] * ns + ks)
        for g, r in zip((gs // ns).tolist(), (gs % ns).tolist()):
            group_spaces[g].extend(members[r])
        for spaces in group_spaces:
            spaces.sort()
        self.groups: list[Group] = []
        counts = np.bincount(comp_group[comp_group >= 0], minlength=uniq_sig.size)
        any_comp = np.full(uniq_sig.size, -1)
        any_comp[comp_group[ordered]] = ordered
        for g in range(uniq_sig.size):
            c = any_comp[g]
            reason, detail = None, ""
            sid = stop_space[c]
            if sid >= 0:
                reason, why = t.stops[int(sid)]
                detail = f"{t.spaces[int(sid)].label} ({why})" if why else t.spaces[int(sid)].label
            csid = cross_space[c]
            cross = f"{t.cross[int(csid)]} at {t.spaces[int(csid)].label}" if csid >= 0 else ""
            if reason is None and counts[g] <= 1:
                reason = Reason.SINGLE_CHANNEL
            group = Group(g, int(counts[g]), reason is None, reason, detail, cross, group_spaces[g], self._producers(group_spaces[g]))
            group._load_members = functools.partial(self._members, group)
            self.groups.append(group)
        self._hide_weight_only_dims()

    def _hide_weight_only_dims(self) -> None:
        """Drop 'groups' that are just an unshrinkable dim of one parameter (a conv kernel's height
        read through ``get_attr``) or entries no op reads (``_unread``): they are not channels. Ids
        are renumbered densely."""
        t = self.table
        reads: dict[str, set[str]] = {}  # parameter target -> names of the get_attr nodes reading it
        for n in self.fx_graph.nodes:
            if n.op == "get_attr":
                reads.setdefault(n.target, set()).add(n.name)
        keep = []
        for g in self.groups:
            if g.prunable and self._unread(g):
                continue
            if g.prunable or g.reason is not Reason.FIXED_DIM:
                keep.append(g)
                continue
            tensors = {(m.module, m.param) for m in g.members}
            if len(tensors) != 1:
                keep.append(g)
                continue
            owner, name = next(iter(tensors))
            getattr_nodes = reads.get(f"{owner}.{name}" if owner else name, set())
            if not all(t.spaces[s].kind == "param" or t.spaces[s].node in getattr_nodes for s in g.spaces):
                keep.append(g)
        if len(keep) == len(self.groups):
            return
        remap = np.full(len(self.groups) + 1, -1, dtype=np.int64)
        for new_id, g in enumerate(keep):
            remap[g.id] = new_id
            g.id = new_id
        cg = self._comp.comp_group
        self._comp.comp_group = np.where(cg >= 0, remap[cg], -1)
        self.groups = keep

    def _unread(self, group: Group) -> bool:
        """Whether no op reads the group's entries: a buffer's tail past a constant slice
        (``position_ids[:, :seq]``) or a ``get_attr`` nobody uses. Unread entries are not channels
        (removing them would only break longer inputs)."""
        t = self.table
        tensors = [t.spaces[s].node for s in group.spaces if t.spaces[s].kind == "tensor"]
        return bool(tensors) and all(n in self._nodes and self._nodes[n].op == "get_attr" for n in tensors)

    def _components(self) -> tuple[int, np.ndarray, _Classes]:
        """Connected components of the atom couplings, honouring size constraints.

        Spaces coupled atom for atom (elementwise ops, residual adds, tied names: most couplings of a
        deep network) are merged first at the space level, so the atom-level solve only sees one
        representative space per class (a 36-layer LLM: ~20x fewer atoms and edges).

        A size constraint (``y.view(..., x.size(1))``) holds when both spaces hold the same units;
        when it does not, the two spaces are coupled index by index and the solve repeats.
        """
        t = self.table
        n = t.n_atoms
        ns = len(t.spaces)
        sizes = np.array([s.size for s in t.spaces], dtype=np.int64)
        offsets = np.array([s.offset for s in t.spaces], dtype=np.int64)
        sa, sb = t.identical_spaces()
        _, space_class = connected_components(coo_matrix((np.ones(sa.size, dtype=np.int8), (sa, sb)), shape=(ns, ns)),
                                              directed=False)
        first = np.full(space_class.max() + 1 if ns else 0, ns, dtype=np.int64)
        np.minimum.at(first, space_class, np.arange(ns))
        rep = first[space_class]  # each space's representative: the first space of its class
        is_rep = rep == np.arange(ns)
        new_offset = np.zeros(ns, dtype=np.int64)
        new_offset[is_rep] = np.cumsum(sizes[is_rep]) - sizes[is_rep]
        m = int(sizes[is_rep].sum())
        atom_map = np.repeat(new_offset[rep] - offsets, sizes) + np.arange(n, dtype=np.int64)
        a, b = t.pair_edges()
        extra_a, extra_b = [atom_map[a]], [atom_map[b]]
        pending = list(t.size_constraints)
        while True:
            ea, eb = np.concatenate(extra_a), np.concatenate(extra_b)
            adj = coo_matrix((np.ones(ea.size, dtype=np.int8), (ea, eb)), shape=(m, m))
            ncomp, labels = connected_components(adj, directed=False)
            comp = labels.astype(np.int64)[atom_map]  # int32 labels overflow in the signature keys
            unmet = []
            for ca_space, cb_space in pending:
                ca, cb = comp[self.table.atoms(ca_space)], comp[self.table.atoms(cb_space)]
                if not np.array_equal(np.sort(ca), np.sort(cb)):
                    unmet.append((ca_space, cb_space))
            if not unmet:
                reps = np.flatnonzero(is_rep)
                original = np.repeat(offsets[reps], sizes[reps]) + (np.arange(m, dtype=np.int64) -
                                                                   np.repeat(new_offset[reps], sizes[reps]))
                return ncomp, comp, _Classes(rep, reps, labels.astype(np.int64), original)
            for ca_space, cb_space in unmet:
                extra_a.append(atom_map[self.table.atoms(ca_space)])
                extra_b.append(atom_map[self.table.atoms(cb_space)])
            pending = [c for c in pending if c not in unmet]

    def _producers(self, spaces: list[int]) -> list[str]:
        """Modules whose output tensor has a space in the group (in graph order, no repeats)."""
        out: dict[str, None] = {}
        for sid in spaces:
            s = self.table.spaces[sid]
            node = self._nodes.get(s.node) if s.kind == "tensor" else None
            if node is not None and node.op == "call_module":
                out.setdefault(node.target)
        return list(out)

    def _members(self, group: Group) -> list[Member]:
        out = []
        g = group.id
        for sid in group.spaces:
            s = self.table.spaces[sid]
            if s.kind != "param":
                continue
            comps = self._comp.atom_comp[s.offset : s.offset + s.size]
            mask = self._comp.comp_group[comps] == g
            idx = np.flatnonzero(mask)
            out.append(Member(s.node, s.param, s.dim, idx, self._comp.comp_unit[comps[mask]]))
        return out

    # -- queries ----------------------------------------------------------------------------
    @property
    def atom_comp(self) -> np.ndarray:
        return self._comp.atom_comp

    def gm_node(self, name: str) -> torch.fx.Node:
        return self._nodes[name]

    def removed_components(self, removed_units: dict[int, np.ndarray]) -> np.ndarray:
        """Boolean per component: True where the unit is removed by ``{group id: unit indices}``."""
        removed = np.zeros(self._comp.comp_group.size, dtype=bool)
        cg, cu = self._comp.comp_group, self._comp.comp_unit
        for gid, units in removed_units.items():
            if len(units) == 0:
                continue
            flag = np.zeros(self.groups[gid].size, dtype=bool)
            flag[np.asarray(units, dtype=np.int64)] = True
            sel = cg == gid
            removed[sel] = flag[cu[sel]]
        return removed

    def space_kept(self, sid: int, removed: np.ndarray) -> np.ndarray:
        s = self.table.spaces[sid]
        return ~removed[self._comp.atom_comp[s.offset : s.offset + s.size]]

    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def to_networkx(self) -> nx.DiGraph:
        """Spaces as nodes (label, size, kind, groups); couplings as edges (with atom counts)."""
        t = self.table
        g = nx.DiGraph()
        comp_group = self._comp.comp_group[self._comp.atom_comp]
        for s in t.spaces:
            groups = sorted(set(comp_group[s.offset : s.offset + s.size].tolist()) - {-1})
            stop = t.stops.get(s.id)
            g.add_node(
                s.label, size=s.size, kind=s.kind, groups=groups,
                stop=stop[0].name if stop else "", cross_channel=t.cross.get(s.id, ""),
            )
        a, b = t.edges()
        if a.size:
            sizes = np.array([s.size for s in t.spaces])
            atom_space = np.repeat(np.arange(len(t.spaces)), sizes)
            sa, sb = atom_space[a], atom_space[b]
            pairs, counts = np.unique(np.stack([sa, sb], 1), axis=0, return_counts=True)
            for (x, y), c in zip(pairs.tolist(), counts.tolist()):
                if x != y:
                    g.add_edge(t.spaces[x].label, t.spaces[y].label, atoms=c)
        return g

    def __repr__(self) -> str:
        n_pr = sum(g.prunable for g in self.groups)
        return f"DependencyGraph({len(self.table.spaces)} spaces, {len(self.groups)} groups, {n_pr} prunable)"


def build_graph(traced: Traced, example_inputs=(), free_outputs=(), gqa: str = "kv") -> DependencyGraph:
    """Dependency graph of a traced model whose nodes carry ``meta['val']``.

    ``free_outputs``: fnmatch patterns over the modules (or fx node names) that produce model
    outputs whose channels may shrink (their consumer outside the model is pruned or retrained too).
    ``gqa``: the unit of grouped-query attention, ``"kv"`` (a KV head with its query heads) or
    ``"query"`` (one query-head position of every KV group; the KV heads stay), ``rules/heads.py``.
    """
    table = SpaceTable()
    table.free_outputs = tuple(free_outputs)
    table.gqa = gqa
    for node in traced.graph.nodes:
        couple_node(table, traced.root, node)
    return DependencyGraph(traced, table, normalize_inputs(example_inputs) if example_inputs != () else ())


def trace(model: nn.Module, example_inputs, leaf_modules=(), free_outputs=(), gqa: str = "kv") -> DependencyGraph:
    """Trace ``model`` and build its channel-dependency graph.

    Examples
    --------
    >>> import torch, surgery
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    >>> g = surgery.trace(net, torch.randn(1, 3, 16, 16))
    >>> [(grp.size, grp.prunable) for grp in g.groups]
    [(3, False), (8, True), (4, False)]
    """
    inputs = normalize_inputs(example_inputs)
    with _gc_paused():
        return build_graph(trace_graph(model, inputs, leaf_modules), inputs, free_outputs, gqa)


@contextlib.contextmanager
def _gc_paused():
    """Tracing creates many small objects and no cycles worth collecting; a full collection every
    few thousand allocations would make deep models quadratic."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
