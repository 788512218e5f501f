"""Plans: which channels every group keeps, and an optional fold. Plain data with a JSON round trip.

A plan also records everything needed to replay it: the example input shapes, the leaf modules, every
option that shaped it, a fingerprint per group (its size and the modules producing its channels)
and a signature of the traced graph. Applying a plan to a model whose groups differ fails and names
the first group that differs, instead of pruning the wrong channels.

A **fold** (``GroupPlan.fold``) is a ``(kept x size)`` matrix ``F`` applied to every consumer's input
slices of the group: ``W_in <- W_in @ F.T`` over the group's channel dim (ThiNet's least-squares
scales are a diagonal ``F`` on the kept channels; C-SGD's merge sums each cluster into its kept
member). ``mode="mask"`` applies the same ``F`` at full width, so pruned == masked still holds. In
JSON a fold is sparse: ``[[row, column, value], ...]``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .dependency_graph import DependencyGraph, Group
from .errors import PlanError

__all__ = ["GroupPlan", "Plan", "check_ratio", "group_fingerprint", "graph_signature"]

PLAN_VERSION = 2


@dataclass(frozen=True)
class GroupPlan:
    """What one group keeps (sorted channel indices) and, optionally, its fold as sparse triples."""

    id: int
    size: int
    keep: tuple[int, ...]
    label: str = ""
    fold: tuple[tuple[int, int, float], ...] = ()
    # bias compensation (FLAP): (removed channel, its mean input: one value, or a tuple with one per input
    # column it owns, e.g. a head's) pairs; every consumer's bias gains sum_c W[:, cols(c)] @ mean_c over
    # them, in both modes (a removed channel then reads as its mean; surgery.compensation)
    shift: tuple[tuple[int, float | tuple[float, ...]], ...] = ()

    @property
    def removed(self) -> list[int]:
        kept = set(self.keep)
        return [i for i in range(self.size) if i not in kept]

    def fold_matrix(self) -> np.ndarray | None:
        """The ``(kept x size)`` fold matrix, or ``None`` when the plan has no fold for this group."""
        if not self.fold:
            return None
        f = np.zeros((len(self.keep), self.size), dtype=np.float64)
        for r, c, v in self.fold:
            f[r, c] = v
        return f

    @staticmethod
    def sparse(matrix: np.ndarray) -> tuple[tuple[int, int, float], ...]:
        rows, cols = np.nonzero(matrix)
        return tuple((int(r), int(c), float(matrix[r, c])) for r, c in zip(rows, cols))


def group_fingerprint(group: Group) -> str:
    """``size:producer,producer,...`` (or the group's first modules when no module produces it)."""
    names = group.producers or group.modules[:3]
    return f"{group.size}:{','.join(names)}"


def _target_name(target) -> str:
    if isinstance(target, str):  # fx numbers the constants it creates per trace: _tensor_constant0, 1, ...
        return re.sub(r"^_tensor_constant\d+$", "_tensor_constant", target)
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or type(target).__name__
    return f"{mod}.{name}" if mod else str(name)


def _computes_tensors(node) -> bool:
    """Whether a node is part of the tensor computation (not size bookkeeping or an input check,
    which differ between a static and a dynamic-shape trace of the same model)."""
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return any(isinstance(v, torch.Tensor) for v in val)
    return isinstance(val, torch.Tensor) or node.op in ("placeholder", "output")


def graph_signature(graph: DependencyGraph) -> str:
    """A short hash of the traced graph's tensor ops (node kinds and targets, in order)."""
    h = hashlib.sha1()
    for n in graph.fx_graph.nodes:
        if _computes_tensors(n):
            h.update(f"{n.op}|{_target_name(n.target)};".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Plan:
    """Which channels of every group survive, plus what is needed to re-trace the model and to
    check that a model is the one the plan was made for."""

    method: str
    policy: str
    ratio: float
    input_shapes: tuple[tuple[int, ...], ...]
    input_dtypes: tuple[str, ...]
    groups: tuple[GroupPlan, ...]
    n_groups: int
    leaf_modules: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)
    fingerprints: tuple[str, ...] = ()  # one per group of the traced graph
    signature: str = ""
    notes: dict = field(default_factory=dict)  # group id -> why the method left it whole

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["version"] = PLAN_VERSION
        d["groups"] = [
            {"id": g.id, "size": g.size, "keep": list(g.keep), "label": g.label, **({"fold": [list(t) for t in g.fold]} if g.fold else {}),
             **({"shift": [list(t) for t in g.shift]} if g.shift else {})}
            for g in self.groups
        ]
        d["notes"] = {str(k): v for k, v in self.notes.items()}
        return d

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        try:
            if d.get("version") != PLAN_VERSION:
                raise PlanError(f"unsupported plan version {d.get('version')!r} (expected {PLAN_VERSION})")
            groups = tuple(
                GroupPlan(int(g["id"]), int(g["size"]), tuple(int(i) for i in g["keep"]), str(g.get("label", "")),
                          tuple((int(r), int(c), float(v)) for r, c, v in g.get("fold", ())),
                          tuple((int(c), tuple(map(float, v)) if isinstance(v, (list, tuple)) else float(v)) for c, v in g.get("shift", ())))
                for g in d["groups"]
            )
            return cls(
                method=str(d["method"]), policy=str(d["policy"]), ratio=float(d["ratio"]),
                input_shapes=tuple(tuple(int(s) for s in shp) for shp in d["input_shapes"]),
                input_dtypes=tuple(str(t) for t in d["input_dtypes"]), groups=groups, n_groups=int(d["n_groups"]),
                leaf_modules=tuple(str(x) for x in d.get("leaf_modules", ())), options=dict(d.get("options", {})),
                fingerprints=tuple(str(x) for x in d.get("fingerprints", ())), signature=str(d.get("signature", "")),
                notes={int(k): str(v) for k, v in dict(d.get("notes", {})).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"not a valid plan: {type(exc).__name__}: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise PlanError(f"not a valid plan: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    # -- use --------------------------------------------------------------------------------
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros(s, dtype=getattr(torch, t.removeprefix("torch."))) for s, t in zip(self.input_shapes, self.input_dtypes))

    def removed_units(self) -> dict[int, list[int]]:
        return {g.id: g.removed for g in self.groups}

    @property
    def n_removed(self) -> int:
        return sum(len(g.removed) for g in self.groups)

    def check_fits(self, graph: DependencyGraph) -> None:
        """Raise :class:`PlanError` unless ``graph`` is the model this plan was made for."""
        if self.fingerprints:
            now = [group_fingerprint(g) for g in graph.groups]
            for i, (want, have) in enumerate(zip(self.fingerprints, now)):
                if want != have:
                    raise PlanError(f"the plan does not fit this model: group {i} was {want!r} when the plan was made, "
                                    f"this model has {have!r}")
            if len(now) != len(self.fingerprints):
                raise PlanError(f"the plan does not fit this model: it was made for {len(self.fingerprints)} groups, "
                                f"this model has {len(now)}")
            if self.signature and self.signature != graph_signature(graph):
                raise PlanError("the plan does not fit this model: its traced graph differs from the one the plan was made for")
        elif len(graph.groups) != self.n_groups:
            raise PlanError(f"plan was made for a graph with {self.n_groups} groups, this model has {len(graph.groups)}")
        for g in self.groups:
            if not 0 <= g.id < len(graph.groups):
                raise PlanError(f"plan group {g.id} does not exist in this model ({len(graph.groups)} groups)")
            real = graph.groups[g.id]
            if real.size != g.size:
                raise PlanError(f"plan group {g.id} has {g.size} channels, the model's has {real.size}")
            if g.removed and not real.prunable:
                raise PlanError(f"plan removes channels from group {g.id}, which is not prunable: {real.why}")
            if not g.keep:
                raise PlanError(f"plan group {g.id} keeps no channel")
            if any(i < 0 or i >= g.size for i in g.keep) or len(set(g.keep)) != len(g.keep):
                raise PlanError(f"plan group {g.id} keeps an index outside 0..{g.size - 1} or twice")
            if any(not (0 <= r < len(g.keep) and 0 <= c < g.size) or not np.isfinite(v) for r, c, v in g.fold):
                raise PlanError(f"plan group {g.id} has a fold entry outside its {len(g.keep)} x {g.size} matrix or not finite")
            if any(c not in g.removed or not np.isfinite(v).all() for c, v in g.shift):
                raise PlanError(f"plan group {g.id} shifts a channel it keeps, or by a value that is not finite")


def check_ratio(ratio, name: str = "ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 <= float(ratio) < 1.0):
        raise PlanError(f"{name} must be a number in [0, 1), got {ratio!r}")
    return float(ratio)
