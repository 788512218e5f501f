"""Training recipes that end in a pruned model, each on :func:`~surgery.train.fit`:

* ``train_csgd``: cluster every prunable group to its target width, train with the centripetal gradient
  (``csgd.Centripetal``; the optimizer's weight decay off for the constrained tensors, which carry it
  in the decay matrix), merge each cluster into its first member (0/1 fold, members averaged first),
  fine-tune.
* ``train_swp``: train with filter skeletons (``swp.SkeletonHook``: L1 on the skeleton, threshold
  re-mask after every step with the masked momentum cleared), optionally raise the threshold to meet
  a MACs budget, remove filters with no live stripe as channels, then run each conv as a
  ``StripeConv`` of its live stripes.
* ``train_from_scratch``: learn channel gates on the frozen network and plan to a MACs target
  (``method="from-scratch"``), then re-initialise the pruned architecture and train it from scratch
  (``budget_train`` scales the epochs by ``1 / (MACs kept)``, Scratch-B).
* ``prune_layerwise``: ThiNet's schedule for any method: prune one group (in network order) through
  the pipeline, fine-tune briefly, score the next group on the pruned, fine-tuned model; a longer
  fine-tune at the end.

Each returns ``(pruned model, report)``: accuracies (validation split, or the training data when
``val_split=0``), params and MACs before and after, the plan or stripe counts. ``model`` is not modified.
"""

from __future__ import annotations

import copy
import dataclasses
import math

from torch import nn

from ..dependency_graph import trace as trace_graph
from ..stats import stats
from .config import Hooks, TrainConfig, TrainError, split
from .csgd import Centripetal, cluster, merge_plan
from .swp import (
    SkeletonHook, add_skeletons, apply_threshold, channel_groups, choose_threshold, dead_channels, stripe_counts, to_stripes,
)
from .trainer import evaluate, fit

__all__ = ["train_csgd", "train_swp", "train_from_scratch", "prune_layerwise", "layer_steps"]


def _sets(data, val_split: float, seed: int):
    x, y = data if isinstance(data, tuple) else (data, None)
    if y is None:
        raise TrainError("training needs labels: data = (x, y)")
    train_set, val_set = split(x, y, val_split, seed)
    return train_set, val_set, val_set or train_set


def _finetune(model, train_set, val_set, config: TrainConfig, epochs: int):
    return fit(model, train_set, val_set, dataclasses.replace(config, epochs=epochs)).epochs if epochs > 0 else []


def train_csgd(model: nn.Module, example_inputs, data, *, ratio: float = 0.5, eps: float = 3e-3, clusters: str = "kmeans",
         epochs: int = 10, finetune_epochs: int = 0, config: TrainConfig = TrainConfig(), val_split: float = 0.2,
         seed: int = 0, average: bool = True):
    """Centripetal SGD: every prunable group (cross-channel ones excepted) keeps ``size - int(ratio*size)``
    clusters; ``eps`` is the centripetal strength; the optimizer's weight decay is the decay
    matrix's ``eta`` for the constrained tensors."""
    from ..rewrite import apply

    train_set, val_set, probe = _sets(data, val_split, seed)
    net = copy.deepcopy(model).eval()
    graph = trace_graph(net, example_inputs)
    groups = [g for g in graph.groups if g.prunable and not g.cross_channel]
    if not groups:
        raise TrainError("C-SGD needs prunable groups; this model has none")
    keep = {g.id: max(1, g.size - int(ratio * g.size)) for g in groups}
    cl = cluster(graph, groups, keep, how=clusters, seed=seed)
    rule = Centripetal(graph, cl, eps=eps, weight_decay=config.weight_decay)
    hist = fit(net, train_set, val_set, dataclasses.replace(config, epochs=epochs),
               Hooks(after_backward=rule.after_backward, no_decay=frozenset(rule.parameter_names())))
    acc_trained = evaluate(net, probe)[0]
    target, plan = merge_plan(net, graph, cl, average=average)
    pruned = apply(target, plan)
    acc_merged = evaluate(pruned, probe)[0]
    ft = _finetune(pruned, train_set, val_set, config, finetune_epochs)
    before, after = stats(model, example_inputs), stats(pruned, example_inputs)
    return pruned, {
        "accuracy": {"trained": acc_trained, "pruned": acc_merged, "finetuned": evaluate(pruned, probe)[0]},
        "params": {"before": before.params, "after": after.params}, "macs": {"before": before.macs, "after": after.macs},
        "plan": plan, "history": {"train": hist.epochs, "finetune": ft},
    }


def train_swp(model: nn.Module, example_inputs, data, *, alpha: float = 1e-5, delta: float = 0.01, epochs: int = 10,
        finetune_epochs: int = 0, config: TrainConfig = TrainConfig(), val_split: float = 0.2, seed: int = 0,
        target_macs: float | None = None):
    """Stripe-wise pruning: skeleton training (``alpha`` L1 strength, ``delta`` threshold; a channel
    whose filters lose every stripe has its BatchNorm affine held at zero), then filters with no live
    stripe removed as channels (a plan through the pipeline) and the rest run as stripe convolutions.
    MACs are counted by stripes. ``target_macs`` (our extension): after training, the threshold is
    raised to the smallest skeleton magnitude whose stripe model keeps at most that fraction of the
    MACs (``swp.choose_threshold``); the report's ``threshold`` says which. ``finetune_epochs`` trains
    the stripe model (its live stripes only) afterwards."""
    if target_macs is not None and not 0 < target_macs <= 1:
        raise TrainError(f"target_macs is the fraction of MACs to keep, in (0, 1], got {target_macs!r}")
    train_set, val_set, probe = _sets(data, val_split, seed)
    net = add_skeletons(model)
    groups = channel_groups(model, example_inputs)
    hook = SkeletonHook(net, alpha=alpha, delta=delta, groups=groups)
    if not hook.skeletons:
        raise TrainError("stripe-wise pruning needs 2-D convolutions with a kernel larger than 1x1 and groups=1")
    hist = fit(net, train_set, val_set, dataclasses.replace(config, epochs=epochs),
               Hooks(after_backward=hook.after_backward, after_step=hook.after_step,
                     on_optimizer=lambda opt: setattr(hook, "optimizer", opt)))
    acc_trained = evaluate(net, probe)[0]
    threshold = delta
    if target_macs is not None:
        threshold = choose_threshold(net, example_inputs, target_macs, delta, groups)
        net = apply_threshold(net, threshold, groups)
    dead = dead_channels(net, groups)
    pruned = to_stripes(net, example_inputs).eval()
    accuracy = {"trained": acc_trained, "pruned": evaluate(pruned, probe)[0]}
    ft = _finetune(pruned, train_set, val_set, config, finetune_epochs)
    if finetune_epochs > 0:
        accuracy["finetuned"] = evaluate(pruned, probe)[0]
    before, after = stats(model, example_inputs), stats(pruned, example_inputs)
    return pruned, {
        "accuracy": accuracy, "threshold": threshold,
        "params": {"before": before.params, "after": after.params}, "macs": {"before": before.macs, "after": after.macs},
        "stripes": stripe_counts(net), "dead_channels": sum(len(v) for v in dead.values()),
        "history": {"train": hist.epochs, "finetune": ft},
    }


def _reinitialise(model: nn.Module) -> None:
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def train_from_scratch(model: nn.Module, example_inputs, data, *, target_macs: float = 0.5, gate_epochs: int = 10,
                 epochs: int = 10, budget_train: bool = False, config: TrainConfig = TrainConfig(),
                 val_split: float = 0.2, seed: int = 0, **gate_options):
    """Pruning from Scratch: gates learned on the frozen network choose the architecture at
    ``target_macs``; the pruned model is re-initialised and trained (Scratch-B with ``budget_train``)."""
    from ..pipeline import run

    train_set, val_set, probe = _sets(data, val_split, seed)
    res = run(model, example_inputs, "from-scratch", 0.5, train_set, target_macs=target_macs, epochs=gate_epochs,
              seed=seed, measure=True, **gate_options)
    pruned = res.model
    _reinitialise(pruned)
    kept = res.after.macs / max(res.before.macs, 1)
    n = math.ceil(epochs / kept) if budget_train else epochs
    hist = fit(pruned, train_set, val_set, dataclasses.replace(config, epochs=n))
    return pruned, {
        "accuracy": {"trained": evaluate(pruned, probe)[0]}, "epochs": n,
        "params": {"before": res.before.params, "after": res.after.params},
        "macs": {"before": res.before.macs, "after": res.after.macs}, "plan": res.plan, "history": {"train": hist.epochs},
    }


def _literal(name: str) -> str:
    """``name`` as an fnmatch pattern that matches only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def layer_steps(model: nn.Module, example_inputs, **options) -> list[tuple[str, str]]:
    """The layer-by-layer schedule of ``model``: ``(pattern, group label)`` for every prunable group, in
    network order (the first call of a module producing its channels); ``pattern`` (for
    ``only_layers``) names a producing module that no other group has, so it selects this group only."""
    from ..dependency_graph.tracing import normalize_inputs
    from ..planner import PlanOptions, leaf_names

    opts = PlanOptions(**{k: v for k, v in options.items() if k in ("leaf_modules", "free_outputs")})
    graph = trace_graph(model, normalize_inputs(example_inputs), leaf_names(model, opts.leaf_modules),
                        tuple(opts.free_outputs))
    first: dict[str, int] = {}
    for i, n in enumerate(graph.fx_graph.nodes):
        if n.op == "call_module":
            first.setdefault(str(n.target), i)
    order = {name: len(first) + i for i, (name, _) in enumerate(model.named_modules())}
    order.update(first)
    owners: dict[str, int] = {}
    for g in graph.groups:
        for name in set(g.producers):
            owners[name] = owners.get(name, 0) + 1
    steps = []
    for g in graph.groups:
        if not g.prunable or not g.producers:
            continue
        own = [name for name in g.producers if owners[name] == 1]
        if not own:
            raise TrainError(f"group {g.label} shares every producing module with another group; "
                             f"it cannot be pruned alone")
        at = min(order.get(name, len(order)) for name in g.producers)
        steps.append((at, g.id, _literal(own[0]), g.label))
    return [(pattern, label) for _, _, pattern, label in sorted(steps)]


def prune_layerwise(model: nn.Module, example_inputs, method: str = "l1", ratio: float = 0.5, data=None, *,
                    epochs_per_step: int = 1, final_epochs: int = 0, config: TrainConfig = TrainConfig(),
                    val_split: float = 0.2, seed: int = 0, loss=None, progress=None, **options):
    """Layer by layer (ThiNet, Luo et al. ICCV 2017): for each prunable group in network order, plan
    with ``method`` on the current model restricted to that group (``only_layers``), apply it through
    :func:`surgery.pipeline.run`, fine-tune ``epochs_per_step`` epochs; then fine-tune
    ``final_epochs``. Data-driven methods therefore score each group on the already pruned and
    fine-tuned model. Every group loses what a one-shot local plan at ``ratio`` (and
    ``layer_ratios``) takes from it; groups the method leaves whole are skipped.

    ``data``: ``(x, y)`` when any fine-tuning is asked (split by ``val_split``; calibration uses the
    training part), else any calibration data (or None for weight-only methods). Returns
    ``(pruned model, report)`` with one entry per step (module, group, channels kept, accuracy after
    its fine-tune) and every step's plan. ``model`` is not modified.
    """
    from ..errors import PlanError
    from ..pipeline import run
    from ..plan import check_ratio
    from ..planner import split_options

    check_ratio(ratio)
    opts, _ = split_options(method, options)
    if opts.target_macs is not None or opts.policy == "global" or opts.submodule or opts.only_layers:
        raise PlanError("the layer-by-layer schedule prunes each group at its own ratio (ratio, layer_ratios); "
                        "target_macs, policy='global', submodule and only_layers are one-shot options")
    for name, n in (("epochs_per_step", epochs_per_step), ("final_epochs", final_epochs)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise TrainError(f"{name} must be an integer >= 0, got {n!r}")
    training = epochs_per_step > 0 or final_epochs > 0
    train_set = val_set = probe = None
    calib = data
    if training:
        train_set, val_set, probe = _sets(data, val_split, seed)
        calib = train_set
    net = copy.deepcopy(model).eval()
    before = stats(model, example_inputs)
    steps, plans = [], []
    acc_start = evaluate(net, probe)[0] if probe is not None else None
    for k, (pattern, label) in enumerate(layer_steps(net, example_inputs, **options)):
        if progress is not None:
            progress(f"step {k + 1}: {label}")
        res = run(net, example_inputs, method, ratio, calib, loss=loss, progress=progress,
                  **{**options, "only_layers": (pattern,)})
        step = {"layer": pattern, "group": label, "pruned": bool(res.plan.groups)}
        if res.plan.groups:
            (gp,) = res.plan.groups
            net = res.model
            step.update(size=gp.size, kept=len(gp.keep))
            if probe is not None:
                step["accuracy_pruned"] = evaluate(net, probe)[0]
            if epochs_per_step > 0:
                _finetune(net, train_set, val_set, config, epochs_per_step)
                step["accuracy"] = evaluate(net, probe)[0]
            plans.append(res.plan)
        else:
            step["why"] = next(iter(res.plan.notes.values()), "the method left it whole")
        steps.append(step)
    acc_pruned = evaluate(net, probe)[0] if probe is not None else None
    ft = _finetune(net, train_set, val_set, config, final_epochs)
    after = stats(net, example_inputs)
    report = {"steps": steps, "plans": plans, "history": {"finetune": ft},
              "params": {"before": before.params, "after": after.params},
              "macs": {"before": before.macs, "after": after.macs}}
    if probe is not None:
        report["accuracy"] = {"before": acc_start, "pruned": acc_pruned, "finetuned": evaluate(net, probe)[0]}
    return net, report
