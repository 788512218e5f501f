"""Plans: which channels every group keeps. Plain data with a JSON round trip.

Policies
--------
* ``local`` (default): every prunable group loses ``int(ratio * size)`` channels, keeping at least one.
* ``global``: channels of all groups are ranked together after dividing each group's scores by their
  mean (so groups with large weights do not dominate); ``int(ratio * total)`` go, each group keeps one.
* per-layer ratios: ``layer_ratios={"layer1.*": 0.3}`` (fnmatch patterns over member module names)
  override ``ratio`` for the groups they match, in either policy's local step.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .dependency_graph import DependencyGraph, Group
from .dependency_graph import trace as trace_graph
from .dependency_graph.tracing import normalize_inputs
from .errors import PlanError
from .methods import get_method

__all__ = ["GroupPlan", "Plan", "plan", "plan_from_graph", "check_ratio"]

PLAN_VERSION = 1


@dataclass(frozen=True)
class GroupPlan:
    id: int
    size: int
    keep: tuple[int, ...]
    label: str = ""

    @property
    def removed(self) -> list[int]:
        kept = set(self.keep)
        return [i for i in range(self.size) if i not in kept]


@dataclass(frozen=True)
class Plan:
    """Which channels of every group survive, plus what is needed to re-trace the model."""

    method: str
    policy: str
    ratio: float
    input_shapes: tuple[tuple[int, ...], ...]
    input_dtypes: tuple[str, ...]
    groups: tuple[GroupPlan, ...]
    n_groups: int
    leaf_modules: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["version"] = PLAN_VERSION
        d["groups"] = [{"id": g.id, "size": g.size, "keep": list(g.keep), "label": g.label} for g in self.groups]
        return d

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        try:
            if d.get("version") != PLAN_VERSION:
                raise PlanError(f"unsupported plan version {d.get('version')!r} (expected {PLAN_VERSION})")
            groups = tuple(GroupPlan(int(g["id"]), int(g["size"]), tuple(int(i) for i in g["keep"]), g.get("label", "")) for g in d["groups"])
            return cls(
                method=str(d["method"]), policy=str(d["policy"]), ratio=float(d["ratio"]),
                input_shapes=tuple(tuple(int(s) for s in shp) for shp in d["input_shapes"]),
                input_dtypes=tuple(str(t) for t in d["input_dtypes"]), groups=groups, n_groups=int(d["n_groups"]),
                leaf_modules=tuple(d.get("leaf_modules", ())), options=dict(d.get("options", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"not a valid plan: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from None

    # -- use --------------------------------------------------------------------------------
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros(s, dtype=getattr(torch, t.removeprefix("torch."))) for s, t in zip(self.input_shapes, self.input_dtypes))

    def removed_units(self) -> dict[int, list[int]]:
        return {g.id: g.removed for g in self.groups}

    @property
    def n_removed(self) -> int:
        return sum(len(g.removed) for g in self.groups)

    def check_fits(self, graph: DependencyGraph) -> None:
        if len(graph.groups) != self.n_groups:
            raise PlanError(f"plan was made for a graph with {self.n_groups} groups, this model has {len(graph.groups)}")
        for g in self.groups:
            real = graph.groups[g.id]
            if real.size != g.size:
                raise PlanError(f"plan group {g.id} has {g.size} channels, the model's has {real.size}")
            if g.removed and not real.prunable:
                raise PlanError(f"plan removes channels from group {g.id}, which is not prunable: {real.why}")
            if not g.keep:
                raise PlanError(f"plan group {g.id} keeps no channel")
            if any(i < 0 or i >= g.size for i in g.keep):
                raise PlanError(f"plan group {g.id} keeps an index outside 0..{g.size - 1}")


def check_ratio(ratio, name: str = "ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 <= float(ratio) < 1.0):
        raise PlanError(f"{name} must be a number in [0, 1), got {ratio!r}")
    return float(ratio)


def _group_ratio(group: Group, ratio: float, layer_ratios: dict[str, float]) -> float:
    """A pattern names layers by their *output* channels: it matches the group's producer modules
    (``conv2`` means conv2's filters, not the input columns of conv2 in the group before)."""
    names = group.producers or group.modules[:1]
    for pattern, r in layer_ratios.items():
        if any(fnmatch.fnmatchcase(m, pattern) for m in names):
            return r
    return ratio


def _local(groups, scores, ratios) -> dict[int, np.ndarray]:
    removed = {}
    for g in groups:
        n = min(int(ratios[g.id] * g.size), g.size - 1)
        order = np.argsort(scores[g.id], kind="stable")
        removed[g.id] = np.sort(order[:n])
    return removed


def _global(groups, scores, ratio: float) -> dict[int, np.ndarray]:
    flat, owner, index = [], [], []
    for g in groups:
        s = np.asarray(scores[g.id], dtype=np.float64)
        norm = s / (np.abs(s).mean() + 1e-12)
        flat.append(norm)
        owner.append(np.full(g.size, g.id))
        index.append(np.arange(g.size))
    if not flat:
        return {}
    flat, owner, index = np.concatenate(flat), np.concatenate(owner), np.concatenate(index)
    budget = int(ratio * flat.size)
    left = {g.id: g.size for g in groups}
    removed: dict[int, list[int]] = {g.id: [] for g in groups}
    for k in np.argsort(flat, kind="stable"):
        if budget == 0:
            break
        gid = int(owner[k])
        if left[gid] > 1:
            removed[gid].append(int(index[k]))
            left[gid] -= 1
            budget -= 1
    return {gid: np.sort(np.array(r, dtype=np.int64)) for gid, r in removed.items()}


def plan_from_graph(
    model: nn.Module, graph: DependencyGraph, method: str = "l1", ratio: float = 0.5, data=None, *,
    policy: str = "local", layer_ratios: dict[str, float] | None = None, skip_cross_channel: bool = False,
    leaf_modules=(), **options,
) -> Plan:
    """Score the prunable groups of ``graph`` with ``method`` and pick the channels to keep."""
    ratio = check_ratio(ratio)
    layer_ratios = {k: check_ratio(v, f"ratio for {k!r}") for k, v in (layer_ratios or {}).items()}
    if policy not in ("local", "global"):
        raise PlanError(f"unknown policy {policy!r}; known policies: global, local")
    m = get_method(method)
    if m.needs_data and data is None:
        raise PlanError(f"method {method!r} needs calibration data (data=...)")
    groups = [g for g in graph.groups if g.prunable and not (skip_cross_channel and g.cross_channel)]
    scores = m.score(model, graph, groups, data, **options) if groups else {}
    for g in groups:
        s = np.asarray(scores.get(g.id, ()), dtype=np.float64)
        if s.shape != (g.size,):
            raise PlanError(f"method {method!r} returned {s.shape} scores for group {g.id} of size {g.size}")
    if policy == "global":
        removed = _global(groups, scores, ratio)
        if layer_ratios:
            matched = [g for g in groups if _group_ratio(g, -1.0, layer_ratios) >= 0]
            removed.update(_local(matched, scores, {g.id: _group_ratio(g, ratio, layer_ratios) for g in matched}))
    else:
        removed = _local(groups, scores, {g.id: _group_ratio(g, ratio, layer_ratios) for g in groups})
    plans = []
    for g in graph.groups:
        gone = set(removed.get(g.id, np.zeros(0, np.int64)).tolist())
        if gone:
            plans.append(GroupPlan(g.id, g.size, tuple(i for i in range(g.size) if i not in gone), g.label))
    inputs = graph.example_inputs
    return Plan(
        method=method, policy=policy, ratio=ratio,
        input_shapes=tuple(tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)),
        input_dtypes=tuple(str(x.dtype) for x in inputs if isinstance(x, torch.Tensor)),
        groups=tuple(plans), n_groups=len(graph.groups),
        leaf_modules=tuple(str(x) for x in leaf_modules if isinstance(x, str)),
        options={"layer_ratios": layer_ratios, "skip_cross_channel": skip_cross_channel,
                 **{k: v for k, v in options.items() if isinstance(v, (int, float, str, bool))}},
    )


def plan(model: nn.Module, example_inputs, method: str = "l1", ratio: float = 0.5, data=None, **options) -> Plan:
    """Trace ``model``, score its groups with ``method`` and return a :class:`Plan`.

    Examples
    --------
    >>> import torch, surgery
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    >>> p = surgery.plan(net, torch.randn(1, 3, 16, 16), method="l1", ratio=0.5)
    >>> [len(g.keep) for g in p.groups]
    [4]
    """
    check_ratio(ratio)
    leaf = options.pop("leaf_modules", ())
    graph = trace_graph(model, normalize_inputs(example_inputs), leaf)
    return plan_from_graph(model, graph, method, ratio, data, leaf_modules=leaf, **options)
