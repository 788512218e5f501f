"""Channel spaces and the atom couplings between them.

A *space* is one dimension of one tensor in the graph (an activation, or a parameter of a module).
Its entries are *atoms*; atoms get global ids ``offset + index``. Op rules add couplings ("atom a of
this space must be removed together with atom b of that space") and stops ("no atom of this space
may be removed"). Connected components of the coupling graph are the removable *units*; the grouping
of units into `Group`s happens in ``graph.py``. All bookkeeping is numpy arrays, so building is
linear in the number of atoms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .reasons import Reason

__all__ = ["Space", "SpaceTable"]


@dataclass(frozen=True)
class Space:
    id: int
    size: int
    offset: int
    kind: str  # "tensor" or "param"
    node: str  # fx node name (tensor) or module qualname (param)
    path: tuple  # position inside a tuple-valued node (tensor); () otherwise
    dim: int
    param: str = ""  # parameter / buffer name for kind == "param"

    @property
    def label(self) -> str:
        if self.kind == "param":
            owner = f"{self.node}.{self.param}" if self.node else self.param
            return f"{owner}[dim {self.dim}]"
        where = self.node + "".join(f"[{p}]" for p in self.path)
        return f"{where}[dim {self.dim}]"


class SpaceTable:
    """Creates spaces and records couplings, stops and cross-channel flags."""

    def __init__(self) -> None:
        self.spaces: list[Space] = []
        self.n_atoms = 0
        self._tensor: dict[tuple, int] = {}
        self._param: dict[tuple, int] = {}
        self._aliases: dict[tuple[int, int], int] = {}
        self._edges_a: list[np.ndarray] = []
        self._edges_b: list[np.ndarray] = []
        self._ranges: list[tuple[int, int, int]] = []
        self._identical: list[tuple[int, int]] = []  # the same couplings as _ranges, as space ids
        self.stops: dict[int, tuple[Reason, str]] = {}
        self.cross: dict[int, str] = {}
        self.touched: set[int] = set()
        #: ``(owner, name, dim)`` of parameter dims that mask mode must not zero (a weight norm's ``v``
        #: along its own dim: zeroing its ``g`` already zeroes the channel, zeroing ``v`` gives 0/0)
        self.mask_exempt: set[tuple[str, str, int]] = set()
        #: fnmatch patterns of model outputs whose channels may shrink (``trace(free_outputs=...)``)
        self.free_outputs: tuple[str, ...] = ()
        #: the unit of grouped-query attention: "kv" or "query" (``trace(gqa=...)``, ``rules/heads.py``)
        self.gqa = "kv"
        self.fed: list[bool] = []
        #: node name -> the space an int was read from (``x.size(1)``), or one entry per int of a
        #: size tuple: a space id or a ``rules.sizes.Literal`` (a constant in some node's arguments)
        self.int_source: dict[str, object] = {}
        #: (node, arg, pos) of a size constant -> the first reshape output space it sizes
        self.literal_dims: dict[tuple, int] = {}
        #: pairs of spaces whose kept counts must agree (a dim sized by another tensor's size)
        self.size_constraints: list[tuple[int, int]] = []
        #: node name -> the spaces of every tensor it produced (filled as nodes are registered)
        self.node_spaces: dict[str, list[int]] = {}  # space reaches a parameter through couplings made so far
        #: what op rules remember between nodes of one build (``rules/statistics.py``, ``rules/rotary.py``)
        self.cache: dict[str, object] = {}

    # -- creation ---------------------------------------------------------------------------
    def _new(self, size: int, kind: str, node: str, path: tuple, dim: int, param: str = "") -> int:
        sid = len(self.spaces)
        self.spaces.append(Space(sid, int(size), self.n_atoms, kind, node, path, dim, param))
        self.fed.append(kind == "param")
        self.n_atoms += int(size)
        return sid

    def tensor(self, node: str, path: tuple, dim: int, size: int | None = None) -> int:
        key = (node, path, dim)
        sid = self._tensor.get(key)
        if sid is None:
            if size is None:
                raise KeyError(key)
            sid = self._tensor[key] = self._new(size, "tensor", node, path, dim)
        return sid

    def param(self, owner: str, name: str, dim: int, size: int, tensor=None) -> int:
        """Space of one dim of a parameter/buffer. Passing ``tensor`` ties the dims of one tensor
        reached under several names (tied weights), so all names are sliced alike."""
        key = (owner, name, dim)
        sid = self._param.get(key)
        if sid is None:
            sid = self._param[key] = self._new(size, "param", owner, (), dim, name)
            if tensor is not None:
                first = self._aliases.setdefault((id(tensor), dim), sid)
                if first != sid:
                    self.identity(first, sid)
        return sid

    def param_spaces(self) -> dict[tuple, int]:
        return dict(self._param)

    def atoms(self, sid: int) -> np.ndarray:
        s = self.spaces[sid]
        return np.arange(s.offset, s.offset + s.size, dtype=np.int64)

    # -- couplings --------------------------------------------------------------------------
    def pairs(self, a: int, ia, b: int, ib) -> None:
        """Couple atom ``ia[k]`` of space ``a`` with atom ``ib[k]`` of space ``b``."""
        ia = np.asarray(ia, dtype=np.int64)
        ib = np.asarray(ib, dtype=np.int64)
        if ia.shape != ib.shape:
            raise ValueError(f"coupling index arrays differ in shape: {ia.shape} vs {ib.shape}")
        sa, sb = self.spaces[a], self.spaces[b]
        self.touched.update((a, b))
        if self.fed[a] or self.fed[b]:
            self.fed[a] = self.fed[b] = True
        if a != b or ia.size:
            self._edges_a.append(ia + sa.offset)
            self._edges_b.append(ib + sb.offset)

    def identity(self, a: int, b: int) -> None:
        sa, sb = self.spaces[a], self.spaces[b]
        if sa.size != sb.size:
            raise ValueError(f"identity coupling between spaces of different sizes: {sa.label} vs {sb.label}")
        self.touched.add(a)
        self.touched.add(b)
        if self.fed[a] or self.fed[b]:
            self.fed[a] = self.fed[b] = True
        if a != b:  # stored as a range, expanded in one vectorised step by edges()
            self._ranges.append((sa.offset, sb.offset, sa.size))
            self._identical.append((a, b))

    def offset(self, part: int, whole: int, start: int) -> None:
        """``part[i]`` is ``whole[start + i]`` (cat inputs, split outputs, slices)."""
        idx = np.arange(self.spaces[part].size)
        self.pairs(part, idx, whole, idx + start)

    def block(self, small: int, big: int) -> None:
        """``small[i]`` owns the block ``big[i*k : (i+1)*k]`` (flatten, depthwise multipliers)."""
        n, m = self.spaces[small].size, self.spaces[big].size
        if n == 0 or m % n:
            raise ValueError(f"block coupling needs {self.spaces[big].label} to be a multiple of {self.spaces[small].label}")
        j = np.arange(m)
        self.pairs(small, j // (m // n), big, j)

    def strided(self, small: int, big: int) -> None:
        """``big[j]`` belongs to ``small[j % n]`` (one copy of ``small`` per period of ``big``)."""
        n, m = self.spaces[small].size, self.spaces[big].size
        if n == 0 or m % n:
            raise ValueError(f"strided coupling needs {self.spaces[big].label} to be a multiple of {self.spaces[small].label}")
        j = np.arange(m)
        self.pairs(small, j % n, big, j)

    def tie_period(self, sid: int, period: int) -> None:
        """Atoms ``j`` and ``j + k*period`` of one space go together (equal pruning per group)."""
        m = self.spaces[sid].size
        if period <= 0 or m % period:
            raise ValueError(f"cannot tie {self.spaces[sid].label} with period {period}")
        j = np.arange(period, m)
        self.pairs(sid, j, sid, j % period)

    def tie_blocks(self, sid: int, block: int) -> None:
        """Atoms inside each contiguous block of ``block`` entries go together (whole groups/heads)."""
        m = self.spaces[sid].size
        if block <= 0 or m % block:
            raise ValueError(f"cannot tie {self.spaces[sid].label} in blocks of {block}")
        j = np.arange(m)
        self.pairs(sid, j, sid, j - j % block)

    def touch(self, sid: int) -> None:
        self.touched.add(sid)

    def stop(self, sid: int, reason: Reason, detail: str = "") -> None:
        self.touched.add(sid)
        self.stops.setdefault(sid, (reason, detail))

    def mark_cross_channel(self, sid: int, detail: str) -> None:
        self.touched.add(sid)
        self.cross.setdefault(sid, detail)

    def identical_spaces(self) -> tuple[np.ndarray, np.ndarray]:
        """Pairs of spaces coupled atom for atom (``identity``), as two arrays of space ids."""
        if not self._identical:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        r = np.array(self._identical, dtype=np.int64)
        return r[:, 0], r[:, 1]

    def pair_edges(self) -> tuple[np.ndarray, np.ndarray]:
        """The couplings other than whole-space identities, as two arrays of global atom ids."""
        if not self._edges_a:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(self._edges_a), np.concatenate(self._edges_b)

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """All couplings as two arrays of global atom ids."""
        a, b = list(self._edges_a), list(self._edges_b)
        if self._ranges:
            r = np.array(self._ranges, dtype=np.int64)
            lengths = r[:, 2]
            within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            a.append(np.repeat(r[:, 0], lengths) + within)
            b.append(np.repeat(r[:, 1], lengths) + within)
        if not a:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(a), np.concatenate(b)
