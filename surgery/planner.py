"""Make a plan from a traced model: run a method, select with a policy, record every option.

``plan_from_graph`` is the only place where a method's scores become a :class:`~surgery.plan.Plan`.
Options are strict: every name is either a planning option (:class:`PlanOptions`) or one the method
declares; anything else is an error that lists the known names. The options that shaped a plan are
stored in it, so ``plan(model, x, method=p.method, ratio=p.ratio, **p.options)`` makes the same plan.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import policies
from ._lazy_weights import LazyWeights
from .calibration import Calibration
from .dependency_graph import DependencyGraph, Reason
from .errors import MethodError, PlanError, RewriteError
from .methods import ScoreContext, Scores, get_method
from .methods._registry import unknown_name
from .methods.context import reading_weights
from .plan import GroupPlan, Plan, check_ratio, graph_signature, group_fingerprint

GQA_UNITS = ("kv", "query")

__all__ = ["GQA_UNITS", "PlanOptions", "split_options", "plan_from_graph", "leaf_names", "score_groups", "build_plan"]


@dataclass(frozen=True)
class PlanOptions:
    """Planning options shared by every method (method options are declared by each method)."""

    policy: str | None = None  # "local", "global" or "uniform"; default local, global with target_macs
    normalize: str | None = None  # global policy's score normalisation; default: the method's
    layer_ratios: dict = field(default_factory=dict)
    skip_cross_channel: bool = False
    leaf_modules: tuple = ()
    round_to: int = 1
    target_macs: float | None = None
    calib_batches: int | None = None
    submodule: str = ""  # prune only this submodule (its real inputs are captured from the whole model)
    free_outputs: tuple = ()  # patterns of model outputs whose channels may shrink
    only_layers: tuple = ()  # patterns over producing modules: only the groups they match are scored and pruned
    # the unit of grouped-query attention: "kv" (a KV head with its query heads) or "query" (the same
    # query-head position in every KV group; the KV heads stay): a trace option, recorded in the plan
    gqa: str = "kv"
    # safetensors file or directory the weights of a meta-device model are read from, lazily; not
    # recorded in the plan: it is where the values come from (like data), the plan is the same as
    # with the weights loaded, and a path is only meaningful on the machine that planned
    weights: str | os.PathLike | None = None

    def check(self) -> "PlanOptions":
        if self.policy is not None and self.policy not in policies.POLICIES:
            raise PlanError(f"unknown policy {self.policy!r}; known policies: {', '.join(policies.POLICIES)}")
        if self.normalize is not None and self.normalize not in policies.NORMALIZE:
            raise PlanError(f"unknown normalize {self.normalize!r}; known: {', '.join(policies.NORMALIZE)}")
        if not isinstance(self.layer_ratios, dict):
            raise PlanError(f"layer_ratios must be a dict of pattern -> ratio, got {type(self.layer_ratios).__name__}")
        for k, v in self.layer_ratios.items():
            check_ratio(v, f"ratio for {k!r}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise PlanError(f"round_to must be a positive integer, got {self.round_to!r}")
        t = self.target_macs
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1):
            raise PlanError(f"target_macs is the fraction of MACs to keep, in (0, 1], got {t!r}")
        if not all(isinstance(p, str) for p in self.free_outputs):
            raise PlanError(f"free_outputs must be module-name patterns, got {self.free_outputs!r}")
        if not all(isinstance(p, str) for p in self.only_layers):
            raise PlanError(f"only_layers must be module-name patterns, got {self.only_layers!r}")
        if self.gqa not in GQA_UNITS:
            raise PlanError(f"unknown gqa {self.gqa!r}; known: {', '.join(GQA_UNITS)}")
        if not isinstance(self.submodule, str):
            raise PlanError(f"submodule must be a qualified module name, got {self.submodule!r}")
        if self.weights is not None and not isinstance(self.weights, (str, os.PathLike)):
            raise PlanError(f"weights must be the path of a .safetensors file or of a directory of them, got {self.weights!r}")
        c = self.calib_batches
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise PlanError(f"calib_batches must be a positive integer, got {c!r}")
        return self


_PLAN_OPTIONS = tuple(f.name for f in dataclasses.fields(PlanOptions))


def leaf_names(model: nn.Module, leaf_modules) -> tuple[str, ...]:
    """Leaf modules as qualified names: classes become the names of the model's modules of that class."""
    out: list[str] = []
    for item in leaf_modules or ():
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            out += [name for name, m in model.named_modules() if name and isinstance(m, item)]
        else:
            raise PlanError(f"leaf_modules entries must be module classes or qualified names, got {item!r}")
    return tuple(dict.fromkeys(out))


def split_options(method: str, options: dict) -> tuple[PlanOptions, dict]:
    """``options`` -> (planning options, resolved method options); unknown names raise."""
    m = get_method(method)
    known_method = {o.name for o in m.options}
    plan_kw = {k: v for k, v in options.items() if k in _PLAN_OPTIONS}
    rest = {k: v for k, v in options.items() if k not in _PLAN_OPTIONS}
    for name in rest:
        if name not in known_method:
            raise PlanError(unknown_name("option", name, (*_PLAN_OPTIONS, *known_method), f"method {method!r}"))
    if "layer_ratios" in plan_kw and plan_kw["layer_ratios"] is None:
        plan_kw["layer_ratios"] = {}
    for key in ("leaf_modules", "free_outputs", "only_layers"):
        if key in plan_kw:
            value = plan_kw[key] or ()
            plan_kw[key] = (value,) if isinstance(value, str) else tuple(value)
    try:
        resolved = m.resolve(rest)
    except MethodError as exc:
        raise PlanError(str(exc)) from None
    return PlanOptions(**plan_kw).check(), resolved


def _on_meta(model) -> bool:
    return model is not None and any(p.is_meta for p in model.parameters())


def score_groups(model, graph, method: str, groups, data, opts: PlanOptions, method_opts: dict, loss, progress) -> Scores:
    """Run ``method`` on ``groups`` (calibration data prepared per its needs); scores checked."""
    m = get_method(method)
    calibration = None
    meta = _on_meta(model)
    if opts.weights is not None and not meta:
        raise PlanError("weights= is only for a model on the meta device (this model's parameters hold their values)")
    if m.needs_data and groups and meta:
        raise PlanError(f"method {method!r} runs the model on calibration data, which a model on the meta device cannot "
                        f"do: load the weights first (e.g. from_pretrained, load_state_dict(..., assign=True)), or plan "
                        f"with weights=CHECKPOINT and a method that only reads weights (l1, l2, group-l1, ...)")
    if "weights" in m.needs and groups and meta and opts.weights is None:
        raise PlanError(f"method {method!r} reads the model's weights, but they are on the meta device (no data): pass "
                        f"weights=CHECKPOINT (a .safetensors file or directory) to read them lazily, load the weights "
                        f"first (e.g. from_pretrained, load_state_dict(..., assign=True)), or plan with a method that "
                        f"reads none (random)")
    if m.needs_data:
        if data is None:
            raise PlanError(f"method {method!r} needs calibration data (data=..., CLI --data)")
        exact = None
        static = getattr(graph.root, "meta", {}).get("surgery_static_batch", True)
        if graph.frontend == "export" and static and graph.example_inputs and isinstance(graph.example_inputs[0], torch.Tensor):
            exact = int(graph.example_inputs[0].shape[0]) if graph.example_inputs[0].dim() else None
        calibration = Calibration(data, max_batches=opts.calib_batches, exact_batch=exact)
        if m.needs_labels and loss is None and not calibration.has_labels:
            raise PlanError(f"method {method!r} needs labels with the calibration data ((x, y) pairs) or loss=...")
    ctx = ScoreContext(model, graph, groups, calibration, loss, progress)
    if opts.weights is not None and groups:
        with LazyWeights(opts.weights, model, graph.root) as source, reading_weights(source):
            result = m.fn(ctx, **method_opts)
    else:
        result = m.fn(ctx, **method_opts) if groups else {}
    scores = result if isinstance(result, Scores) else Scores(dict(result or {}))
    for gid in list(scores.scores):
        s = np.asarray(scores.scores[gid], dtype=np.float64)
        size = graph.groups[gid].size
        if s.shape != (size,):
            raise PlanError(f"method {method!r} returned {s.shape} scores for group {gid} of size {size}")
        if not np.isfinite(s).all():
            raise PlanError(f"method {method!r} returned a non-finite score for group {gid}")
        scores.scores[gid] = s
    return scores


def _select(groups, scores: dict, ratio: float, opts: PlanOptions, normalize: str, k_global: int | None,
            fit: Callable | None = None) -> dict:
    lr = opts.layer_ratios
    if (opts.policy or "local") in ("global", "uniform") or k_global is not None:
        matched = [g for g in groups if policies.group_ratio(g, -1.0, lr) >= 0]
        free = [g for g in groups if g not in matched]
        k = k_global if k_global is not None else int(ratio * sum(g.size for g in free))
        removed = policies.global_(free, scores, k, normalize)
        removed.update(policies.local(matched, scores, {g.id: policies.group_ratio(g, ratio, lr) for g in matched}))
    else:
        removed = policies.local(groups, scores, {g.id: policies.group_ratio(g, ratio, lr) for g in groups})
    if opts.policy == "uniform":
        removed = policies.uniform(groups, scores, removed)
    removed = policies.round_kept(groups, scores, removed, opts.round_to)
    return fit(groups, scores, removed) if fit is not None else removed


def build_plan(graph, method: str, ratio: float, policy: str, opts: PlanOptions, method_opts: dict, scores: Scores,
               removed: dict, leaves: tuple[str, ...]) -> Plan:
    """The :class:`Plan` for ``removed`` (``{gid: channel indices}``), with folds from ``scores.fold``,
    the recorded options, fingerprints and the graph signature."""
    plans = []
    for g in graph.groups:
        gone = set(np.asarray(removed.get(g.id, ()), dtype=np.int64).tolist())
        if not gone:
            continue
        keep = tuple(i for i in range(g.size) if i not in gone)
        fold = scores.fold(g.id, np.array(keep)) if scores.fold is not None else None
        if fold is not None:
            fold = np.asarray(fold, dtype=np.float64)
            if fold.shape != (len(keep), g.size) or not np.isfinite(fold).all():
                raise PlanError(f"method {method!r} returned a fold of shape {fold.shape} for group {g.id} "
                                f"(expected {(len(keep), g.size)}, finite)")
        mean = scores.shift.get(g.id)
        shift = tuple((int(c), mean[c] if isinstance(mean[c], tuple) else float(mean[c])) for c in sorted(gone) if np.any(mean[c])) if mean is not None else ()
        plans.append(GroupPlan(g.id, g.size, keep, g.label, GroupPlan.sparse(fold) if fold is not None else (), shift))
    recorded = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name != "weights"}
    recorded["leaf_modules"] = list(leaves)
    recorded["free_outputs"] = list(opts.free_outputs)
    recorded["only_layers"] = list(opts.only_layers)
    recorded = {k: v for k, v in recorded.items() if v != getattr(PlanOptions(), k) or k == "policy"}
    recorded["policy"] = policy
    inputs = graph.example_inputs
    return Plan(
        method=method, policy=policy, ratio=ratio,
        input_shapes=tuple(tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)),
        input_dtypes=tuple(str(x.dtype) for x in inputs if isinstance(x, torch.Tensor)),
        groups=tuple(plans), n_groups=len(graph.groups), leaf_modules=leaves,
        options={**recorded, **method_opts}, fingerprints=tuple(group_fingerprint(g) for g in graph.groups),
        signature=graph_signature(graph), notes=dict(scores.skipped),
    )


def plan_from_graph(model: nn.Module, graph: DependencyGraph, method: str = "l1", ratio: float = 0.5, data=None, *,
                    loss: Callable | None = None, progress: Callable[[str], None] | None = None,
                    macs_of: Callable[[Plan], float] | None = None, verify: Callable[[Plan], object] | None = None,
                    **options) -> Plan:
    """Score the prunable groups of ``graph`` with ``method`` and pick the channels to keep.

    ``macs_of(plan)`` (MACs of the model a plan would give) is needed for ``target_macs``.
    ``verify(plan)`` applies a plan and raises :class:`RewriteError` when the rewrite cannot honour
    it; the groups at fault are then found one by one, left whole with the rewrite's reason
    (``Reason.NOT_REWRITABLE``) and the plan is made again, so a plan the rewrite rejects is never
    returned.
    """
    ratio = check_ratio(ratio)
    opts, method_opts = split_options(method, options)
    m = get_method(method)
    leaves = leaf_names(model, opts.leaf_modules)
    groups = [g for g in graph.groups if g.prunable and not (opts.skip_cross_channel and g.cross_channel)
              and (not opts.only_layers or _matches(g, opts.only_layers))]
    hf = _hf_fitter(model, graph)
    left = {g.id: hf.undescribable[g.id] for g in groups if g.id in hf.undescribable} if hf is not None else {}
    groups = [g for g in groups if g.id not in left]
    scores = score_groups(model, graph, method, groups, data, opts, method_opts, loss, progress)
    scores.skipped.update(left)
    fit = hf.fit if hf is not None else None
    normalize = opts.normalize or m.normalize
    policy = opts.policy or ("global" if opts.target_macs is not None else "local")
    if opts.target_macs is not None and macs_of is None:
        raise PlanError("target_macs needs a way to count MACs (use surgery.plan / surgery.prune)")
    while True:
        scored = [g for g in groups if g.id in scores.scores and g.prunable]
        try:
            if opts.target_macs is None:
                removed = _select(scored, scores.scores, ratio, opts, normalize, None, fit)
                plan = build_plan(graph, method, ratio, policy, opts, method_opts, scores, removed, leaves)
            else:
                plan = _macs_search(graph, method, ratio, policy, opts, method_opts, scores, scored, normalize, leaves, macs_of, fit)
            if verify is not None and plan.groups:
                verify(plan)
            return plan
        except RewriteError:
            if verify is None or not _leave_whole_what_fails(graph, verify, plan_of=lambda gp: _one_group(graph, gp, method, ratio, policy, opts, method_opts, leaves)):
                raise


def _hf_fitter(model: nn.Module, graph: DependencyGraph):
    """For a Hugging Face model, the groups its config has no width for and the adjustment that keeps
    the hidden width describable (:class:`surgery.hf.fit.HFFit`); None for any other model."""
    from .hf.config import is_hf_model

    if not is_hf_model(model):
        return None
    from .hf.fit import fitter

    return fitter(model, graph)


def _matches(group, patterns) -> bool:
    """Whether a module producing ``group``'s channels matches one of ``patterns`` (as ``layer_ratios``)."""
    names = group.producers or group.modules[:1]
    return any(fnmatch.fnmatchcase(m, p) for p in patterns for m in names)


def _one_group(graph, gp: GroupPlan, method, ratio, policy, opts, method_opts, leaves) -> Plan:
    base = build_plan(graph, method, ratio, policy, opts, method_opts, Scores({}), {}, leaves)
    return dataclasses.replace(base, groups=(gp,))


def _leave_whole_what_fails(graph: DependencyGraph, verify, plan_of) -> bool:
    """Mark every group whose pruning alone makes the rewrite fail as not prunable; False if none."""
    bad = 0
    for g in graph.groups:
        if not g.prunable or g.size < 2:
            continue
        gp = GroupPlan(g.id, g.size, tuple(range(1, g.size)), g.label)
        try:
            verify(plan_of(gp))
        except RewriteError as err:
            g.prunable, g.reason, g.reason_detail = False, Reason.NOT_REWRITABLE, str(err)
            bad += 1
    return bad > 0


def _macs_search(graph, method, ratio, policy, opts, method_opts, scores, scored, normalize, leaves, macs_of, fit) -> Plan:
    """Bisection for the plan whose MACs are closest to ``target_macs`` x the original's.

    Global policy: over the number of channels removed across groups; local: over the uniform ratio
    (in steps of 1/1000). Returns the closest plan seen, not the last one tried."""
    target = float(opts.target_macs)
    base = macs_of(build_plan(graph, method, ratio, policy, opts, method_opts, scores, {}, leaves))
    if base <= 0:
        raise PlanError("the model has no MACs to reduce")
    glob = policy in ("global", "uniform")
    hi = policies.removable([g for g in scored if policies.group_ratio(g, -1.0, opts.layer_ratios) < 0]) if glob else 999
    best: tuple[float, Plan] | None = None
    lo = 0
    for _ in range(max(1, math.ceil(math.log2(hi + 2))) + 2):
        if lo > hi:
            break
        mid = (lo + hi) // 2
        removed = _select(scored, scores.scores, mid / 1000 if not glob else ratio, opts, normalize, mid if glob else None, fit)
        p = build_plan(graph, method, (mid / 1000) if not glob else ratio, policy, opts, method_opts, scores, removed, leaves)
        frac = macs_of(p) / base
        if best is None or abs(frac - target) < best[0]:
            best = (abs(frac - target), p)
        if frac > target:
            lo = mid + 1
        else:
            hi = mid - 1
    assert best is not None
    return best[1]
