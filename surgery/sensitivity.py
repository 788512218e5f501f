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

import gc
import fnmatch
import glob
import math
from collections.abc import Callable, Iterable

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
from .planner import build_plan, leaf_names, score_groups, split_options
from .plan import check_ratio
from .rewrite import apply_to_graph
from .sensitivity_report import CSV_HEADER, SensitivityResult, SensitivityRow

__all__ = ["sensitivity", "SensitivityResult", "SensitivityRow", "CSV_HEADER"]

DEFAULT_RATIOS = (0.1, 0.3, 0.5, 0.7)

# Planning options that choose *how many* channels each group loses: a sensitivity analysis
# fixes that itself (one group, one ratio at a time), so they are refused rather than ignored.
_NOT_APPLICABLE = ("policy", "normalize", "layer_ratios", "round_to", "target_macs")


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
    scores = score_groups(model, graph, method, chosen, _replay(batches, calibration), opts, method_opts, loss, progress)
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
                p = build_plan(graph, method, r, "local", opts, method_opts, scores, removed, leaves)
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
