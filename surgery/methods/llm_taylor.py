"""First-order group Taylor for language models, LLM-Pruner style (Ma, Fang, Wang, "LLM-Pruner: On the
Structural Pruning of Large Language Models", NeurIPS 2023).

Removing a channel sets every weight of its group to zero (the producer's rows, the consumers'
columns, the norm's entries, ...). To first order the loss changes by ``-sum_k w_k dL/dw_k`` over
those weights ``k``, so the channel's importance is::

    I_c = sum over every weight k removed with c of | w_k * g_k |       (taylor="element", default)
    I_c = | sum over every weight k removed with c of  w_k * g_k |      (taylor="vector")

with ``g`` the gradient of the causal language-model loss (next-token cross-entropy, the labels
shifted by one) averaged over the calibration batches. Labels default to the input ids themselves
(text calibration yields ``(ids, ids)``); with class labels ``(x, y)`` the loss is the cross-entropy
of the class logits, so the criterion also runs on classifiers; ``loss=`` replaces the loss. Gradients are taken with
``torch.func.functional_call`` on detached copies of the parameters: no ``.grad`` of the model is
touched. A channel whose weights are all zero scores 0. Scores are loss changes in the loss's own
units, so the global policy compares them raw (``normalize="none"``).

``element`` is LLM-Pruner's ``param_first`` (the first-order term of each weight, its magnitude
summed over the group), the estimator its scripts use; ``vector`` is its ``vectorwise`` estimate of the
whole group's first-order term, whose signed sum cancels near a minimum of the loss (on the README's
demo Llama it removes channels barely better than ``random``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..calibration.recorder import default_loss
from ..dependency_graph.tracing import eval_mode
from ..errors import PlanError
from ._registry import Option, register_method
from .context import ScoreContext, Scores
from .obd import scored_parameters

__all__ = ["causal_lm_loss", "llm_taylor"]

PAPER = "Ma, Fang, Wang, LLM-Pruner: On the Structural Pruning of Large Language Models, NeurIPS 2023"


def causal_lm_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``outputs``' logits ``(batch, seq, vocab)`` against ``labels``
    ``(batch, seq)`` shifted by one; for class labels ``(batch,)`` (a classifier calibrated with
    ``(x, y)``), the cross-entropy of the class logits."""
    from ..hf.perplexity import logits_of

    if labels is not None and labels.dim() == 1:
        return default_loss(outputs, labels)
    logits = logits_of(outputs)
    if logits.dim() != 3 or labels is None or labels.dim() != 2:
        raise PlanError("llm-taylor needs token ids (batch, seq) with logits (batch, seq, vocab), or class labels")
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))


def _labels(inputs, labels):
    if labels is not None:
        return labels
    x = inputs[0]
    return x if isinstance(x, torch.Tensor) and not x.is_floating_point() else None


def mean_gradients(ctx: ScoreContext, names: set[str]) -> dict[str, torch.Tensor]:
    """Gradient of the loss (``ctx.loss`` or :func:`causal_lm_loss`) for the canonical parameters
    ``names``, averaged over the calibration batches (float64)."""
    gm = ctx.graph.gm
    params = dict(gm.named_parameters())
    fixed = {n: p.detach() for n, p in params.items() if n not in names}
    total = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in names}
    loss_fn = ctx.loss or causal_lm_loss
    count = 0
    with eval_mode(gm):
        for b, (inputs, labels) in enumerate(ctx.calibration, 1):
            if ctx.progress is not None:
                ctx.progress(f"calibration batch {b}")
            live = {n: params[n].detach().requires_grad_() for n in names}
            with torch.enable_grad():
                value = loss_fn(torch.func.functional_call(gm, {**fixed, **live}, inputs), _labels(inputs, labels))
                keys = list(live)
                grads = torch.autograd.grad(value, [live[k] for k in keys], allow_unused=True)
            for k, g in zip(keys, grads):
                if g is not None:
                    total[k] += g.detach().double().cpu()
            count += 1
    return {n: t / max(count, 1) for n, t in total.items()}


@register_method("llm-taylor", "first-order Taylor |w x dL/dw| summed over every weight removed with the channel (LLM-Pruner), causal LM loss",
                 paper=PAPER, needs=("data",), normalize="none",
                 options=(Option("taylor", str, "element", "'element': sum of |w x g| (LLM-Pruner's param_first); "
                                 "'vector': |sum of w x g| over the group (its vectorwise)", choices=("element", "vector")),))
def llm_taylor(ctx: ScoreContext, taylor: str):
    """Score = sum (element) or |sum| (vector) over the group's weights of the channel of w * mean gradient."""
    names = scored_parameters(ctx)
    grads = mean_gradients(ctx, set(names.values()))
    params = dict(ctx.graph.gm.named_parameters())
    scores, skipped = {}, {}
    for g in ctx.groups:
        signed = np.zeros(g.size, dtype=np.float64)
        found = False
        for m in g.members:
            key = names.get(f"{m.module}.{m.param}" if m.module else m.param)
            if key is None:
                continue
            found = True
            wg = params[key].detach().double().cpu() * grads[key]
            if taylor == "element":
                wg = wg.abs()
            dims = [d for d in range(wg.dim()) if d != m.dim]
            per_index = (wg.sum(dim=dims) if dims else wg).numpy()
            np.add.at(signed, m.units, per_index[m.indices])
        if found:
            scores[g.id] = np.abs(signed)
        else:
            skipped[g.id] = "no parameter is removed with these channels (nothing to score)"
    return Scores(scores, skipped)
