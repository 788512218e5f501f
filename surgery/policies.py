"""Selection policies: from per-channel scores to the channels each group loses.

* ``local``: every group loses ``int(ratio * size)`` channels (its lowest scores), keeping at least one.
* ``global``: channels of all groups are ranked together; with ``normalize="mean"`` each group's
  scores are first divided by their mean magnitude (so groups with large weights do not dominate),
  with ``"none"`` raw scores are compared (network slimming's |gamma| ranking). ``k`` channels go,
  and every group keeps at least one.
* per-layer ratios: ``{"layer4.*": 0.7}`` (fnmatch patterns over the modules that produce a group's
  channels) override the ratio for the groups they match, as a local step in either policy.
* ``uniform``: ranked as ``global``, then every *kind* of group (same size, same producing modules
  up to the layer index: the MLP neurons of every block, the KV groups of every attention, ...) has
  its removed channels spread evenly, each group losing its own lowest-scored ones, so every layer
  keeps the same width (what a stock Hugging Face config can describe).
* ``round_to=N``: each group of at least N channels keeps a multiple of N (the nearest, at least N).

Examples
--------
>>> import numpy as np
>>> from types import SimpleNamespace as G
>>> groups = [G(id=0, size=4, producers=["a"], modules=["a"]), G(id=1, size=4, producers=["b"], modules=["b"])]
>>> scores = {0: np.array([4., 3, 2, 1]), 1: np.array([1., 1, 1, 9])}
>>> {k: v.tolist() for k, v in local(groups, scores, {0: 0.5, 1: 0.5}).items()}
{0: [2, 3], 1: [0, 1]}
>>> {k: v.tolist() for k, v in global_(groups, scores, 3, "none").items()}
{0: [3], 1: [0, 1]}
"""

from __future__ import annotations

import fnmatch
import re

import numpy as np

__all__ = ["POLICIES", "NORMALIZE", "local", "global_", "uniform", "kind_of", "group_ratio", "round_kept", "removable", "nearest_multiple", "lowest"]

POLICIES = ("local", "global", "uniform")
NORMALIZE = ("mean", "none")


def group_ratio(group, ratio: float, layer_ratios: dict[str, float]) -> float:
    """The ratio for ``group``: the first layer pattern matching one of its producers, else ``ratio``.

    A pattern names layers by their *output* channels (``conv2`` means conv2's filters, not the input
    columns of conv2 in the group before)."""
    names = group.producers or group.modules[:1]
    for pattern, r in layer_ratios.items():
        if any(fnmatch.fnmatchcase(m, pattern) for m in names):
            return r
    return ratio


def _lowest(scores: np.ndarray, n: int) -> np.ndarray:
    return np.sort(np.argsort(scores, kind="stable")[:n])


def local(groups, scores, ratios: dict[int, float]) -> dict[int, np.ndarray]:
    """Each group loses ``int(ratio * size)`` of its lowest-scored channels (keeping at least one)."""
    return {g.id: _lowest(scores[g.id], min(int(ratios[g.id] * g.size), g.size - 1)) for g in groups}


def removable(groups) -> int:
    """How many channels a global policy can remove at most (every group keeps one)."""
    return sum(g.size - 1 for g in groups)


def global_(groups, scores, k: int, normalize: str = "mean") -> dict[int, np.ndarray]:
    """Remove the ``k`` lowest channels across ``groups`` (each keeps at least one)."""
    if not groups:
        return {}
    flat, owner, index = [], [], []
    for g in groups:
        s = np.asarray(scores[g.id], dtype=np.float64)
        if normalize == "mean":
            s = s / (np.abs(s).mean() + 1e-12)
        flat.append(s)
        owner.append(np.full(g.size, g.id))
        index.append(np.arange(g.size))
    flat, owner, index = np.concatenate(flat), np.concatenate(owner), np.concatenate(index)
    left = {g.id: g.size for g in groups}
    removed: dict[int, list[int]] = {g.id: [] for g in groups}
    budget = int(k)
    for j in np.argsort(flat, kind="stable"):
        if budget <= 0:
            break
        gid = int(owner[j])
        if left[gid] > 1:
            removed[gid].append(int(index[j]))
            left[gid] -= 1
            budget -= 1
    return {gid: np.sort(np.array(r, dtype=np.int64)) for gid, r in removed.items()}


def kind_of(group) -> tuple:
    """Groups of one kind: the same size and the same producing modules once layer indices are
    dropped (``model.layers.3.mlp.up_proj`` -> ``model.layers.#.mlp.up_proj``)."""
    names = group.producers or group.modules[:3]
    return (group.size, tuple(sorted({re.sub(r"\.\d+(?=\.|$)", ".#", m) for m in names})))


def uniform(groups, scores, removed: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Spread each kind's removed channels evenly over its groups (each keeps at least one; the
    average is rounded to the nearest count); every group loses its own lowest-scored channels.

    >>> import numpy as np
    >>> from types import SimpleNamespace as G
    >>> gs = [G(id=i, size=4, producers=[f"l.{i}.fc"]) for i in range(2)]
    >>> out = uniform(gs, {0: np.array([1., 2, 3, 4]), 1: np.array([4., 3, 2, 1])}, {0: np.array([0, 1, 2]), 1: np.array([3])})
    >>> {k: v.tolist() for k, v in out.items()}
    {0: [0, 1], 1: [2, 3]}
    """
    kinds: dict[tuple, list] = {}
    for g in groups:
        kinds.setdefault(kind_of(g), []).append(g)
    out = dict(removed)
    for members in kinds.values():
        total = sum(len(removed.get(g.id, ())) for g in members)
        n = min(int(np.floor(total / len(members) + 0.5)), members[0].size - 1)
        for g in members:
            out[g.id] = _lowest(np.asarray(scores[g.id], dtype=np.float64), n)
    return out


def round_kept(groups, scores, removed: dict[int, np.ndarray], n: int) -> dict[int, np.ndarray]:
    """Adjust each pruned group of at least ``n`` channels so that it keeps a multiple of ``n`` (the nearest
    one, at least ``n``; the group's size when no multiple fits); the lowest scores go.

    >>> import numpy as np
    >>> from types import SimpleNamespace as G
    >>> g = G(id=0, size=20)
    >>> round_kept([g], {0: np.arange(20.)}, {0: np.arange(7)}, 8)[0].tolist()   # keeps 13 -> 16
    [0, 1, 2, 3]
    """
    if n <= 1:
        return removed
    out = dict(removed)
    for g in groups:
        if g.size < n or len(removed.get(g.id, ())) == 0:
            continue  # groups the policy leaves whole stay whole
        target = nearest_multiple(g.size - len(removed[g.id]), g.size, n)
        out[g.id] = _lowest(np.asarray(scores[g.id], dtype=np.float64), g.size - target)
    return out


def nearest_multiple(kept: int, size: int, n: int) -> int:
    """The multiple of ``n`` nearest ``kept`` (at least ``n``, at most ``size``; ``size`` itself when
    no multiple fits).

    >>> nearest_multiple(13, 20, 8), nearest_multiple(19, 20, 8), nearest_multiple(3, 5, 8)
    (16, 16, 5)
    """
    if n <= 1 or kept % n == 0:
        return kept
    if size < n:
        return size
    return min(size - size % n, max(n, int(np.floor(kept / n + 0.5)) * n))


def lowest(scores, n: int) -> np.ndarray:
    """The ``n`` lowest-scored channels, ascending (ties: the first ones)."""
    return _lowest(np.asarray(scores, dtype=np.float64), n)
