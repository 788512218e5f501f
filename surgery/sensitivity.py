"""Sensitivity analysis (Li et al. 2017, "Pruning Filters for Efficient ConvNets", section 3.3).

Each prunable group is pruned **alone** at each ratio (its ``int(ratio * size)`` lowest-scored
channels go, at least one is kept: exactly what ``policy="local"`` does) and the pruned model is
measured on calibration data:

* with labels: the mean loss (cross-entropy of the logits, or ``loss(outputs, labels)``) and, for
  integer labels, top-1 accuracy;
* always: the relative output error against the original model, ``||y_pruned - y|| / ||y||`` over
  every floating output of every batch.

The model is traced once and scored once; every (group, ratio) pair is a one-group plan applied to
the same traced graph. The calibration batches are read once and reused (so a shuffling
``DataLoader`` still compares like with like), one baseline pass gives the original's outputs.

:meth:`SensitivityResult.layer_ratios` turns the curves into per-layer ratios for
``plan(..., layer_ratios=...)`` / ``surgery prune --layer-ratio @FILE``: for each group, the largest
tested ratio that stays within the tolerance (and every smaller tested ratio too); a group already
hurt at the smallest ratio gets ``0.0``, so it is explicitly kept whole.

Examples
--------
>>> import torch, surgery
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
>>> x = torch.randn(16, 3, 8, 8)
>>> s = surgery.sensitivity(net, x[:1], x, ratios=(0.25, 0.5))
>>> [(r.producer, r.ratio, r.kept) for r in s.rows]
[('0', 0.25, 6), ('0', 0.5, 4)]
>>> s.baseline["error"], s.metric
(0.0, 'error')
>>> s.layer_ratios(max_error=10.0)
{'0': 0.5}
"""

from __future__ import annotations

import csv
import gc
import fnmatch
import glob
import io
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import policies
from .calibration import Calibration
from .calibration.data import DataError
from .dependency_graph import DependencyGraph, Group
from .dependency_graph import trace as trace_graph
from .dependency_graph.tracing import eval_mode, normalize_inputs
from .errors import PlanError, SurgeryError
from .planner import _build, _run_method, leaf_names, split_options
from .plan import check_ratio
from .rewrite import apply_to_graph

__all__ = ["sensitivity", "SensitivityResult", "SensitivityRow", "CSV_HEADER"]

DEFAULT_RATIOS = (0.1, 0.3, 0.5, 0.7)
DEFAULT_MAX_DROP = 0.01
DEFAULT_MAX_ERROR = 0.05
CSV_HEADER = ("group", "producer", "label", "size", "ratio", "kept", "loss", "accuracy", "accuracy_drop", "error")

# Planning options that choose *how many* channels each group loses: a sensitivity analysis
# fixes that itself (one group, one ratio at a time), so they are refused rather than ignored.
_NOT_APPLICABLE = ("policy", "normalize", "layer_ratios", "round_to", "target_macs")


@dataclass(frozen=True)
class SensitivityRow:
    """One group pruned alone at one ratio, and what the pruned model scored."""

    group: int
    producer: str  # the layer-ratio key: the group's first producer module (exact, escaped for fnmatch); "" if none
    label: str
    size: int
    ratio: float
    kept: int
    loss: float | None  # None without labels
    accuracy: float | None  # None without integer labels
    error: float  # relative output error vs the original model


@dataclass
class SensitivityResult:
    """Rows ``(group, ratio)`` in group order, the original model's metrics, and what was left out."""

    method: str
    ratios: tuple[float, ...]
    baseline: dict  # {"loss": .., "accuracy": .., "error": 0.0}; loss/accuracy None without labels
    rows: list[SensitivityRow]
    samples: int = 0
    skipped: dict = field(default_factory=dict)  # group id -> why it has no rows

    @property
    def metric(self) -> str:
        """``"accuracy"`` with integer labels, else ``"error"`` (what the plot and the rule use)."""
        return "accuracy" if self.baseline.get("accuracy") is not None else "error"

    def curves(self) -> dict[int, list[SensitivityRow]]:
        """Rows per group id, in ratio order."""
        out: dict[int, list[SensitivityRow]] = {}
        for r in self.rows:
            out.setdefault(r.group, []).append(r)
        return out

    # -- per-layer ratios ---------------------------------------------------------------------
    def layer_ratios(self, max_drop: float | None = None, max_error: float | None = None) -> dict[str, float]:
        """``{pattern: ratio}`` for ``layer_ratios=`` / ``--layer-ratio @FILE``.

        A tested ratio passes when the top-1 accuracy drops by at most ``max_drop`` (absolute,
        0.01 = one point; default 0.01) with labels, or when the relative output error is at most
        ``max_error`` (default 0.05) without them; ``max_error`` given with labels must hold too.
        Each group gets the largest ratio that passes *together with every smaller tested ratio*
        (one noisy lucky point does not count); a group that fails at its smallest ratio gets
        ``0.0``, so a plan keeps it whole instead of pruning it at the default ratio. The key is
        the group's first producer module whose name belongs to no other group: an exact name,
        fnmatch-escaped, so it matches that group only. Groups with no such name are left out.
        """
        for name, v in (("max_drop", max_drop), ("max_error", max_error)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or math.isinf(v)):
                raise PlanError(f"{name} must be a finite number >= 0, got {v!r}")
        acc = self.metric == "accuracy"
        if max_drop is not None and not acc:
            raise PlanError("max_drop needs labelled data (accuracy); without labels use max_error")
        if acc and max_drop is None:
            max_drop = DEFAULT_MAX_DROP
        if not acc and max_error is None:
            max_error = DEFAULT_MAX_ERROR

        def passes(r: SensitivityRow) -> bool:
            ok = True
            if max_drop is not None:
                ok = self.baseline["accuracy"] - r.accuracy <= max_drop + 1e-12
            if max_error is not None:
                ok = ok and r.error <= max_error
            return ok

        out: dict[str, float] = {}
        for rows in self.curves().values():
            if not rows[0].producer:
                continue
            best = 0.0
            for r in rows:
                if not passes(r):
                    break
                best = r.ratio
            out[rows[0].producer] = best
        return out

    def layer_ratios_text(self, max_drop: float | None = None, max_error: float | None = None) -> str:
        """The :meth:`layer_ratios` as ``PATTERN=RATIO`` lines (with a ``#`` header) for ``@FILE``."""
        lr = self.layer_ratios(max_drop, max_error)
        if self.metric == "accuracy":
            rule = f"accuracy drop <= {DEFAULT_MAX_DROP if max_drop is None else max_drop:g}"
            rule += f", output error <= {max_error:g}" if max_error is not None else ""
        else:
            rule = f"output error <= {DEFAULT_MAX_ERROR if max_error is None else max_error:g}"
        head = [f"# surgery sensitivity: method {self.method}, ratios {','.join(f'{r:g}' for r in self.ratios)}, {rule}",
                "# use with: surgery prune MODEL --method " + self.method + " --layer-ratio @THIS_FILE"]
        return "\n".join([*head, *(f"{k}={v:g}" for k, v in lr.items())]) + "\n"

    # -- files --------------------------------------------------------------------------------
    def csv_text(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_HEADER)
        base_acc = self.baseline.get("accuracy")

        def num(v):
            return "" if v is None else f"{v:.6g}"

        for r in self.rows:
            drop = None if r.accuracy is None or base_acc is None else base_acc - r.accuracy
            w.writerow([r.group, r.producer, r.label, r.size, f"{r.ratio:g}", r.kept, num(r.loss), num(r.accuracy),
                        num(drop), num(r.error)])
        return buf.getvalue()

    def to_csv(self, path) -> None:
        """One row per (group, ratio), header :data:`CSV_HEADER`; empty cells for missing metrics."""
        with open(path, "w", newline="") as f:
            f.write(self.csv_text())

    def png(self, legend_max: int = 10) -> bytes:
        """The plot as PNG bytes (see :meth:`plot`)."""
        try:
            from matplotlib import colormaps
            from matplotlib.cm import ScalarMappable
            from matplotlib.colors import Normalize
            from matplotlib.figure import Figure
            from matplotlib.ticker import PercentFormatter
        except ImportError:
            raise SurgeryError("the sensitivity plot needs matplotlib (pip install matplotlib)") from None
        acc = self.metric == "accuracy"
        curves = self.curves()
        base = self.baseline["accuracy"] if acc else 0.0
        fig = Figure(figsize=(9, 5.5))  # no pyplot: no global backend or figure state (Agg canvas)
        ax = fig.add_subplot()
        n = len(curves)

        def harm(rows) -> tuple[float, float]:  # worst point, then the mean over the ratios
            h = [(base - r.accuracy) if acc else r.error for r in rows]
            return max(h), sum(h) / len(h)

        ranked = sorted(curves, key=lambda gid: harm(curves[gid]), reverse=True)
        named = set(ranked[:legend_max])
        many = n > legend_max
        cmap = colormaps["viridis" if many else "tab10"]
        for i, (gid, rows) in enumerate(curves.items()):
            color = cmap(i / max(1, n - 1)) if many else cmap(i % 10)
            xs = [0.0, *(r.ratio for r in rows)]
            ys = [base, *((r.accuracy if acc else r.error) for r in rows)]
            name = rows[0].producer or rows[0].label
            ax.plot(xs, ys, marker="o", markersize=3, color=color, lw=1.6 if gid in named else 0.8,
                    alpha=1.0 if gid in named else 0.5, label=f"{name} ({rows[0].size})" if gid in named else None)
        if acc:
            ax.axhline(base, color="gray", ls="--", lw=0.8, label="unpruned")
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlabel("fraction of the group's channels removed (one group at a time)")
        ax.set_ylabel("top-1 accuracy" if acc else "relative output error ||y' - y|| / ||y||")
        ax.set_title(f"Sensitivity to pruning ({self.method}, {self.samples} samples)")
        ax.grid(alpha=0.3)
        if many:
            fig.colorbar(ScalarMappable(Normalize(0, n - 1), cmap), ax=ax, pad=0.02, label="group order, input to output")
        if n:
            title = f"the {legend_max} most sensitive of {n} groups (layer, channels)" if many else "layer (channels)"
            ax.legend(title=title, fontsize=7, title_fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13),
                      ncol=min(3, legend_max), frameon=False)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        return buf.getvalue()

    def plot(self, path, legend_max: int = 10) -> None:
        """A PNG: one curve per group, ratio on x, accuracy (labels) or output error on y.

        With more than ``legend_max`` groups, curves are coloured by depth (colour bar) and only
        the ``legend_max`` most sensitive (worst at the largest ratio) are named in the legend."""
        data = self.png(legend_max)
        with open(path, "wb") as f:
            f.write(data)


# -- measuring -------------------------------------------------------------------------------------
def _tensors(y) -> list[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y] if y.is_floating_point() else []
    if isinstance(y, (tuple, list)):
        return [t for v in y for t in _tensors(v)]
    if isinstance(y, dict):
        return [t for v in y.values() for t in _tensors(v)]
    return []


class _Meter:
    """Runs a model over the cached batches and reduces to (loss, accuracy, error)."""

    def __init__(self, batches: list, loss: Callable | None):
        self.batches = batches
        self.loss = loss
        self.labelled = batches[0][1] is not None
        self.n = sum(len(ys if ys is not None else xs[0]) for xs, ys in batches)
        self.reference: list[list[torch.Tensor]] = []
        self.ref_norm2 = 0.0
        self.has_accuracy = self.labelled

    def _loss_and_hits(self, out, y: torch.Tensor) -> tuple[float, float | None]:
        if self.loss is not None:
            value = float(self.loss(out, y))
            logits = _tensors(out)[0] if _tensors(out) else None
        else:
            flat = _tensors(out)
            if not flat:
                raise DataError("the model returns no floating tensor to compute a loss from; pass loss=...")
            logits = flat[0]
            try:
                value = float(F.cross_entropy(logits.float(), y))
            except (RuntimeError, ValueError, IndexError) as exc:
                raise DataError(f"cannot compute the cross-entropy of outputs {tuple(logits.shape)} with labels "
                                f"{tuple(y.shape)}: {str(exc).splitlines()[0]}; pass loss=...") from None
        hits = None
        if self.has_accuracy and logits is not None and not y.is_floating_point() and logits.dim() >= 2:
            pred = logits.argmax(1)
            if pred.shape == y.shape:
                hits = float((pred == y).sum())
        if hits is None:
            self.has_accuracy = False
        return value * len(y), hits

    def measure(self, model: nn.Module, baseline: bool = False) -> dict:
        loss_sum, hits, err2 = 0.0, 0.0, 0.0
        with torch.no_grad():
            for i, (xs, y) in enumerate(self.batches):
                out = model(*xs)
                flat = [t.detach().float() for t in _tensors(out)]
                if baseline:
                    self.reference.append(flat)
                    self.ref_norm2 += sum(float(t.pow(2).sum()) for t in flat)
                else:
                    ref = self.reference[i]
                    if [t.shape for t in flat] != [t.shape for t in ref]:
                        raise SurgeryError("the pruned model's outputs have other shapes than the original's")
                    err2 += sum(float((a - b).pow(2).sum()) for a, b in zip(flat, ref))
                if self.labelled:
                    ls, h = self._loss_and_hits(out, y)
                    loss_sum += ls
                    hits += h or 0.0
        error = 0.0 if baseline else math.sqrt(err2) / max(math.sqrt(self.ref_norm2), 1e-12)
        return {"loss": loss_sum / self.n if self.labelled else None,
                "accuracy": hits / self.n if self.labelled and self.has_accuracy else None, "error": error}


def _unique_names(graph: DependencyGraph) -> dict[int, str]:
    """Group id -> its first producer (or first module, as :func:`policies.group_ratio` reads it)
    that no other prunable group lists, fnmatch-escaped; "" when every name is shared. (Layer ratios
    only ever apply to prunable groups, so an input group sharing a name does not matter.)"""
    owners: dict[str, set[int]] = {}
    for g in graph.groups:
        if not g.prunable:
            continue
        for name in g.producers or g.modules[:1]:
            owners.setdefault(name, set()).add(g.id)
    out = {}
    for g in graph.groups:
        names = [n for n in (g.producers or g.modules[:1]) if n and owners.get(n) == {g.id}]
        out[g.id] = glob.escape(names[0]) if names else ""
    return out


def _select_groups(graph: DependencyGraph, candidates: list[Group], groups) -> list[Group]:
    if groups is None:
        return candidates
    if isinstance(groups, (str, int)):
        groups = [groups]
    chosen: dict[int, Group] = {}
    by_id = {g.id: g for g in candidates}
    for item in groups:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise PlanError(f"groups entries must be group ids or module name patterns, got {item!r}")
        if isinstance(item, int):
            if not 0 <= item < len(graph.groups):
                raise PlanError(f"group {item} does not exist ({len(graph.groups)} groups)")
            if item not in by_id:
                g = graph.groups[item]
                raise PlanError(f"group {item} ({g.label}) cannot be analysed: "
                                f"{g.why or 'it is cross-channel and skip_cross_channel is set'}")
            chosen[item] = by_id[item]
            continue
        hit = [g for g in candidates if any(fnmatch.fnmatchcase(m, item) for m in (g.producers or g.modules[:1]))]
        if not hit:
            raise PlanError(f"no prunable group is produced by a module matching {item!r}")
        chosen.update((g.id, g) for g in hit)
    return [chosen[k] for k in sorted(chosen)]


def _check_ratios(ratios) -> tuple[float, ...]:
    if isinstance(ratios, (int, float)):
        ratios = (ratios,)
    out = sorted({check_ratio(r) for r in ratios})
    if not out:
        raise PlanError("sensitivity needs at least one ratio")
    return tuple(out)


def _replay(batches: list, calibration: Calibration) -> Calibration:
    """The cached batches as calibration data for the method (a one-shot iterator is read only
    once); multi-input batches with labels have no such form, so those re-read ``calibration``."""
    items = []
    for xs, y in batches:
        if len(xs) != 1:
            return calibration
        items.append(xs[0] if y is None else (xs[0], y))
    return Calibration(items)


def _noop(_: str) -> None:
    pass


def sensitivity(model: nn.Module, example_inputs, data, ratios: Iterable[float] = DEFAULT_RATIOS, method: str = "l1", *,
                loss: Callable | None = None, groups=None, progress: Callable[[str], None] | None = None,
                **options) -> SensitivityResult:
    """Prune each prunable group alone at each of ``ratios`` and measure the model on ``data``.

    ``data``: calibration data as for :func:`surgery.plan` (a tensor, ``(x, y)``, an iterable of
    batches); with labels the rows hold the loss (cross-entropy, or ``loss(outputs, labels)``, a
    batch mean) and top-1 accuracy, and always the relative output error vs ``model``.
    ``groups``: group ids or fnmatch patterns over producer modules (default: every prunable group
    that ``method`` scores). ``options``: ``leaf_modules``, ``skip_cross_channel``,
    ``calib_batches`` (bounds both scoring and measuring) and the method's own; options that set
    how much each group loses (``policy``, ``layer_ratios``, ``round_to``, ...) are refused.
    ``model`` is not modified (its training flags are restored).
    """
    step = progress or _noop
    ratios = _check_ratios(ratios)
    for name in _NOT_APPLICABLE:
        if name in options:
            raise PlanError(f"option {name!r} does not apply to a sensitivity analysis (it prunes one group at a "
                            f"time at each ratio)")
    opts, method_opts = split_options(method, options)
    if data is None:
        raise PlanError("sensitivity needs calibration data to measure on (data=..., CLI --data)")
    inputs = normalize_inputs(example_inputs)
    calibration = Calibration(data, max_batches=opts.calib_batches)
    batches = list(calibration)  # read once: every pruned model sees the same samples in the same order
    meter = _Meter(batches, loss)

    leaves = leaf_names(model, opts.leaf_modules)
    step("tracing the dependency graph")
    graph = trace_graph(model, inputs, leaves)
    candidates = [g for g in graph.groups if g.prunable and not (opts.skip_cross_channel and g.cross_channel)]
    chosen = _select_groups(graph, candidates, groups)
    step(f"scoring channels with {method}")
    scores = _run_method(model, graph, method, chosen, _replay(batches, calibration), opts, method_opts, loss, progress)
    skipped = {gid: why for gid, why in scores.skipped.items()}
    scored = [g for g in chosen if g.id in scores.scores]
    for g in chosen:
        if g.id not in scores.scores:
            skipped.setdefault(g.id, f"{method} gave no scores")
    names = _unique_names(graph)

    step("measuring the unpruned model")
    with eval_mode(model):
        baseline = meter.measure(model, baseline=True)
    if not meter.has_accuracy:
        baseline["accuracy"] = None
    rows: list[SensitivityRow] = []
    total = sum(len({min(int(r * g.size), g.size - 1) for r in ratios} - {0}) for g in scored)
    done = 0
    for g in scored:
        by_count: dict[int, dict] = {0: baseline}
        for r in ratios:
            removed = policies.local([g], scores.scores, {g.id: r})
            n = len(removed[g.id])
            if n not in by_count:
                done += 1
                step(f"[{done}/{total}] {g.label}: {n} of {g.size} channels removed")
                p = _build(graph, method, r, "local", opts, method_opts, scores, removed, leaves)
                pruned = apply_to_graph(graph, p, "prune").eval()
                by_count[n] = meter.measure(pruned)
                del pruned
                gc.collect()
            m = by_count[n]
            acc = m["accuracy"] if meter.has_accuracy else None
            rows.append(SensitivityRow(g.id, names[g.id], g.label, g.size, r, g.size - n, m["loss"], acc, m["error"]))
    if not meter.has_accuracy:
        baseline["accuracy"] = None
        rows = [SensitivityRow(**{**r.__dict__, "accuracy": None}) for r in rows]
    return SensitivityResult(method, ratios, baseline, rows, meter.n, skipped)
