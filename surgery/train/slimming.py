"""Network slimming (Liu et al., ICCV 2017; seed 002-003): L1 sparsity on BN gammas, prune by |gamma|, fine-tune.

1. Sparsity training: after every backward, ``gamma.grad += s * sign(gamma)`` for the norm layers on
   the prunable groups' channels (the paper: s = 1e-4 for VGG, 1e-5 for ResNets).
2. ``bn-gate`` pruning with the global policy and raw scores (``normalize="none"``) to ``ratio``
   (``int(N * ratio)`` channels go, the smallest ``|gamma|`` first, each group keeps one) or to a MACs
   target.
3. Fine-tuning of the pruned model.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from .config import Hooks, TrainConfig, TrainError, split
from .trainer import evaluate, fit

__all__ = ["sparsity_hook", "slimmed_norms", "slimming"]


def slimmed_norms(model: nn.Module, example_inputs) -> list[str]:
    """Qualified names of the norm layers whose scale sits on a prunable group's channels."""
    from ..dependency_graph import trace
    from ..roles import norm_members

    graph = trace(model, example_inputs)
    names = []
    for g in graph.prunable_groups:
        for m in norm_members(model, g):
            if m.module not in names:
                names.append(m.module)
    return names


def sparsity_hook(names: list[str], s: float):
    """An ``after_backward`` hook adding ``s * sign(gamma)`` to the gradient of each named norm's weight."""
    if not s >= 0:
        raise TrainError(f"sparsity must be a non-negative number, got {s!r}")

    def after_backward(model: nn.Module) -> None:
        with torch.no_grad():
            for name in names:
                w = model.get_submodule(name).weight
                if w.grad is None:
                    w.grad = torch.zeros_like(w)
                w.grad.add_(torch.sign(w), alpha=s)

    return after_backward


def slimming(model: nn.Module, example_inputs, data, *, sparsity: float = 1e-4, ratio: float = 0.5,
             target_macs: float | None = None, epochs: int = 10, finetune_epochs: int = 5,
             config: TrainConfig = TrainConfig(), finetune_config: TrainConfig | None = None, val_split: float = 0.2,
             seed: int = 0):
    """Sparsity-train a copy of ``model`` on ``data = (x, y)``, prune it by |gamma|, fine-tune it.

    Returns ``(pruned, report)``; ``report`` holds the accuracies (validation split, or the training
    data when ``val_split=0``) after sparsity training, after pruning and after fine-tuning, the
    params / MACs before and after, the number of channels removed, the plan and the sparsity-trained
    model before pruning (``sparse_model``).
    ``model`` is not modified.
    """
    from ..pipeline import run

    x, y = data if isinstance(data, tuple) else (data, None)
    train_set, val_set = split(x, y, val_split, seed)
    probe = val_set or train_set
    net = copy.deepcopy(model)
    names = slimmed_norms(net, example_inputs)
    if not names:
        raise TrainError("network slimming needs norm layers on prunable channels; this model has none")
    hist = fit(net, train_set, val_set, dataclasses.replace(config, epochs=epochs),
               Hooks(after_backward=sparsity_hook(names, sparsity)))
    acc_base = evaluate(net, probe)[0]
    options = {"policy": "global", "normalize": "none"}
    if target_macs is not None:
        options["target_macs"] = target_macs
    res = run(net, example_inputs, "bn-gate", ratio, measure=True, **options)
    pruned = res.model
    acc_pruned = evaluate(pruned, probe)[0]
    ft = dataclasses.replace(finetune_config or config, epochs=finetune_epochs) if finetune_epochs > 0 else None
    ft_hist = fit(pruned, train_set, val_set, ft) if ft else None
    acc_ft = evaluate(pruned, probe)[0]
    report = {
        "accuracy": {"sparse": acc_base, "pruned": acc_pruned, "finetuned": acc_ft},
        "params": {"before": res.before.params, "after": res.after.params},
        "macs": {"before": res.before.macs, "after": res.after.macs},
        "removed": sum(g.size - len(g.keep) for g in res.plan.groups),
        "norms": names, "plan": res.plan, "sparse_model": net, "history": {"sparse": hist.epochs, "finetune": ft_hist.epochs if ft_hist else []},
    }
    return pruned, report
