"""Keep unstructured-pruning masks through training: masked gradients, weights re-masked after each step.

``mask_hooks(masks)`` is a :class:`~surgery.train.config.Hooks` for :func:`surgery.train.fit`:

* ``after_backward``: gradients of removed weights are set to zero, so neither the step nor the
  momentum buffer moves them (weight decay of a zero weight is zero too);
* ``after_step``: removed weights are set to zero again, so the mask holds exactly whatever the
  optimiser does (Adam's epsilon, a resumed momentum buffer, a user's custom step).

>>> import torch
>>> from surgery.sparsity import prune_unstructured, masks_of
>>> from surgery.train import TrainConfig, fit
>>> net = prune_unstructured(torch.nn.Linear(8, 3), 0.5)
>>> x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
>>> _ = fit(net, (x, y), None, TrainConfig(epochs=2, lr=0.1, batch_size=8, progress=False), mask_hooks(masks_of(net)))
>>> int((net.weight == 0).sum())
12
"""

from __future__ import annotations

import torch
from torch import nn

from ..sparsity import masks_from_zeros, masks_of
from .config import Hooks, TrainError

__all__ = ["mask_hooks", "unstructured_hooks"]


def _masked(model: nn.Module, masks: dict[str, torch.Tensor]):
    """(parameter, removed-entries mask on its device) pairs; a name the model lacks is an error."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out = []
    for name, keep in masks.items():
        p = params.get(name)
        if p is None or p.shape != keep.shape:
            raise TrainError(f"mask {name} {tuple(keep.shape)} matches no parameter of the model being trained")
        out.append((p, ~keep.to(p.device, torch.bool)))
    return out


def mask_hooks(masks: dict[str, torch.Tensor]) -> Hooks:
    """Hooks that keep every entry with ``masks[name] == False`` at exactly zero while training."""
    masks = {n: m.detach().to("cpu", torch.bool) for n, m in masks.items()}
    cache: dict = {}

    def pairs(model: nn.Module):
        key = (id(model), tuple((id(p), p.device) for p in model.parameters()))
        if cache.get("key") != key:  # built once per model and device
            cache["key"], cache["pairs"] = key, _masked(model, masks)
        return cache["pairs"]

    def after_backward(model: nn.Module) -> None:
        for p, removed in pairs(model):
            if p.grad is not None:
                p.grad.masked_fill_(removed, 0.0)

    def after_step(model: nn.Module) -> None:
        with torch.no_grad():
            for p, removed in pairs(model):
                p.masked_fill_(removed, 0.0)

    return Hooks(after_backward=after_backward, after_step=after_step)


def unstructured_hooks(model: nn.Module, from_zeros: bool = False) -> Hooks:
    """:func:`mask_hooks` for ``model``'s own masks (attached by pruning, else read from its zeros)."""
    return mask_hooks(masks_from_zeros(model) if from_zeros else masks_of(model))
