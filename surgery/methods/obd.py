"""Optimal Brain Damage (LeCun, Denker, Solla, "Optimal Brain Damage", NIPS 1990), for channels.

OBD estimates the loss increase of deleting a parameter from a second-order expansion around a
trained minimum with a diagonal Hessian: ``s_i = H_ii * w_i^2 / 2``. Here ``H_ii`` is approximated by
the diagonal of the empirical Fisher, ``F_ii = E[(dL/dw_i)^2]``, and a channel's saliency is the sum
of ``0.5 * F_ii * w_i^2`` over **every parameter entry removed with it**: all of the group's members
that are parameters (producer filters and biases, norm affine weights, consumer input columns,
attention projections); buffers such as BatchNorm running statistics are not parameters and do not
count. A channel whose weights are all zero, or that no gradient reaches, has saliency 0.

``per_sample`` chooses the expectation:

* ``False`` (default, one backward pass per batch): ``F = mean over calibration batches of
  (dL_b/dw)^2`` with ``L_b`` the batch loss (``loss(outputs, labels)``, default the batch-mean
  cross-entropy). This is a per-batch Fisher: cheaper, and smaller than the per-sample one by
  roughly the batch size for the noise part, uniformly across parameters.
* ``True``: the per-sample empirical Fisher ``F = mean over examples of (dl_n/dw)^2``, with
  per-example gradients from ``torch.func.vmap(torch.func.grad(...))`` (each example run as a batch
  of one; memory grows with batch size x the scored parameters).

Gradients are taken with ``torch.func.functional_call`` on detached copies of the parameters and
``torch.autograd.grad``: no parameter's ``.grad`` is touched and the model's weights are never
changed (``functional_call`` swaps the copies in for the duration of a call and puts the originals
back), BatchNorm and dropout run in eval mode. No activation is observed: the score is made of
parameters and their loss gradients only, so every prunable group with a parameter is scored.
Saliencies estimate loss increases in the loss's own units, comparable across groups, so the global
policy ranks them raw (``normalize="none"``), as OBD ranks all parameters together.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..calibration.recorder import default_loss
from ..dependency_graph.tracing import eval_mode
from ..errors import PlanError
from ._registry import Option, register_method
from .context import ScoreContext, Scores

PAPER = "LeCun, Denker & Solla, Optimal Brain Damage, NIPS 1990"


def _member_name(module: str, param: str) -> str:
    return f"{module}.{param}" if module else param


def scored_parameters(ctx: ScoreContext) -> dict[str, str]:
    """``{member parameter name: canonical name in the traced module}`` over every group of ``ctx``
    (tied parameters map to one canonical name)."""
    canonical: dict[int, str] = {}
    names: dict[str, str] = {}
    for name, p in ctx.graph.gm.named_parameters(remove_duplicate=False):
        names[name] = canonical.setdefault(id(p), name)
    out = {}
    for g in ctx.groups:
        for m in g.members:
            full = _member_name(m.module, m.param)
            if full in names:
                out[full] = names[full]
    return out


def fisher_diagonal(ctx: ScoreContext, names: set[str], per_sample: bool = False,
                    loss: Callable | None = None) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher (float64) of the canonical parameters ``names`` over the calibration data."""
    loss_fn = loss or ctx.loss
    if loss_fn is None and not ctx.calibration.has_labels:
        raise PlanError("method 'obd' needs labels with the calibration data ((x, y) pairs) or loss=...")
    loss_fn = loss_fn or default_loss
    if not names:
        return {}
    gm = ctx.graph.gm
    params = dict(gm.named_parameters())
    fixed = {n: p.detach() for n, p in params.items() if n not in names}
    total = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in names}
    count = 0
    with eval_mode(gm):
        for b, (inputs, labels) in enumerate(ctx.calibration, 1):
            if ctx.progress is not None:
                ctx.progress(f"calibration batch {b}")
            live = {n: params[n].detach().requires_grad_() for n in names}
            if per_sample:
                grads, n = _per_sample_grads(gm, fixed, live, inputs, labels, loss_fn)
                for k, g in grads.items():
                    total[k] += g.double().square().sum(0).cpu()
                count += n
            else:
                with torch.enable_grad():
                    value = loss_fn(torch.func.functional_call(gm, {**fixed, **live}, inputs), labels)
                    keys = list(live)
                    grads = torch.autograd.grad(value, [live[k] for k in keys], allow_unused=True)
                for k, g in zip(keys, grads):
                    if g is not None:
                        total[k] += g.detach().double().square().cpu()
                count += 1
    return {n: t / max(count, 1) for n, t in total.items()}


def _per_sample_grads(gm, fixed, live, inputs, labels, loss_fn):
    from torch.func import functional_call, grad, vmap

    def one(p, xs, y):
        out = functional_call(gm, {**fixed, **p}, tuple(x.unsqueeze(0) for x in xs))
        return loss_fn(out, None if y is None else y.unsqueeze(0))

    detached = {k: v.detach() for k, v in live.items()}
    try:
        with torch.enable_grad():
            grads = vmap(grad(one), in_dims=(None, 0, None if labels is None else 0))(detached, tuple(inputs), labels)
    except Exception as exc:  # vmap rejects some ops (data-dependent control flow, in-place on inputs)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PlanError(f"obd per_sample=True: per-example gradients with torch.func.vmap failed ({first}); "
                        f"use per_sample=False") from None
    return grads, int(inputs[0].shape[0])


def saliency(ctx: ScoreContext, fisher: dict[str, torch.Tensor], names: dict[str, str]) -> dict[int, np.ndarray]:
    """Per group: sum over its parameter members of 0.5 * F * w^2, scattered onto the group's channels."""
    out = {}
    gm = ctx.graph.gm
    params = dict(gm.named_parameters())
    for g in ctx.groups:
        total = np.zeros(g.size, dtype=np.float64)
        found = False
        for m in g.members:
            key = names.get(_member_name(m.module, m.param))
            if key is None:
                continue
            found = True
            w = params[key].detach().double().cpu()
            s = 0.5 * fisher[key] * w.square()
            dims = [d for d in range(s.dim()) if d != m.dim]
            per_index = (s.sum(dim=dims) if dims else s).numpy()
            np.add.at(total, m.units, per_index[m.indices])
        if found:
            out[g.id] = total
    return out


@register_method("obd", "Optimal Brain Damage: sum of 0.5 * Fisher diagonal * w^2 over every weight removed with the channel",
                 paper=PAPER, needs=("data", "labels"), normalize="none",
                 options=(Option("per_sample", bool, False,
                                 "per-example Fisher via torch.func.vmap (default: squared per-batch gradients)"),))
def obd(ctx: ScoreContext, per_sample: bool):
    """Saliency of a channel = sum over the group's parameter entries of 0.5 * E[g^2] * w^2."""
    names = scored_parameters(ctx)
    fisher = fisher_diagonal(ctx, set(names.values()), per_sample)
    scores = saliency(ctx, fisher, names)
    skipped = {g.id: "no parameter is removed with these channels (nothing to score)" for g in ctx.groups
               if g.id not in scores}
    return Scores(scores, skipped)
