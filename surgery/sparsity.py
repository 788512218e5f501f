"""Unstructured magnitude pruning (Han et al., 2015): zero the individual weights of smallest magnitude.

This is not a channel method: it removes single weights, keeps every shape, and makes no channel
plan, so it is not in the method registry (whose contract is a score per channel of a group). The
pipeline routes ``method="magnitude-unstructured"`` here by name (:func:`surgery.pipeline.prune`).

* **Prunable weights**: the ``weight`` of every ``nn.Linear`` and convolution (``nn.Conv*d``,
  ``nn.ConvTranspose*d``); biases and norm parameters are never pruned.
* **Scope**: ``"global"`` ranks all prunable weights together (one threshold); ``"layer"`` prunes
  each weight tensor to the same sparsity. Exactly ``int(sparsity * n)`` weights go (``n`` the count
  over all prunable weights, or per tensor); ties at the threshold go in index order.
* **Masks**: the result carries its masks (``masks_of``; ``True`` = kept) so fine-tuning keeps them
  (:func:`surgery.train.masks.mask_hooks`). They are held beside the model (a weak reference), not in
  it, so checkpoints and ``state_dict`` are unchanged; a model without them (a reloaded checkpoint, a
  copy) gets them back from its zeros.
* **Sparse inference**: :func:`sparse_inference` swaps ``nn.Linear`` layers at or above a sparsity for
  :class:`SparseLinear` (CSR weight, ``torch.sparse.mm``); ``bench/sparse.py`` measures where that pays.

Examples
--------
>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 5))
>>> sparse = prune_unstructured(net, 0.9)              # 300 weights: exactly 270 go
>>> sum(int((m.weight == 0).sum()) for m in (sparse[0], sparse[2])), int((net[0].weight == 0).sum())
(270, 0)
>>> sum(int((~m).sum()) for m in masks_of(sparse).values())
270
"""

from __future__ import annotations

import copy
import warnings
import weakref

import torch
from torch import nn

from .errors import PlanError

__all__ = [
    "UNSTRUCTURED", "SCOPES", "prunable_weights", "magnitude_masks", "apply_masks", "attach_masks", "masks_of",
    "masks_from_zeros", "prune_unstructured", "check_sparsity", "SparseLinear", "sparse_inference",
]

#: The pipeline's name for this method (``surgery prune --method magnitude-unstructured``).
UNSTRUCTURED = "magnitude-unstructured"
SCOPES = ("global", "layer")
_PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)
#: model -> its masks; beside the model rather than in it, so no checkpoint codec ever stores them
_MASKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Qualified name -> ``weight`` of every Linear and convolution (a shared weight is listed once)."""
    out, seen = {}, set()
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None) if isinstance(mod, _PRUNABLE) else None
        if isinstance(w, nn.Parameter) and w.is_floating_point() and id(w) not in seen:
            seen.add(id(w))
            out[f"{name}.weight" if name else "weight"] = w
    return out


def check_sparsity(sparsity, scope: str = "global") -> float:
    """``sparsity`` as a float in [0, 1) and ``scope`` in :data:`SCOPES`, else a one-line ``PlanError``."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise PlanError(f"sparsity must be a number in [0, 1) (the share of weights set to zero), got {sparsity!r}")
    if scope not in SCOPES:
        raise PlanError(f"unknown scope {scope!r}; known scopes: {', '.join(SCOPES)}")
    return float(sparsity)


def _drop_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask over the flat ``scores`` marking exactly ``k`` smallest (ties in index order)."""
    drop = torch.zeros(scores.numel(), dtype=torch.bool)
    if k <= 0:
        return drop
    threshold = scores.kthvalue(k).values
    drop = scores < threshold
    missing = k - int(drop.sum())
    if missing > 0:
        drop[(scores == threshold).nonzero().flatten()[:missing]] = True
    return drop


def magnitude_masks(model: nn.Module, sparsity: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Keep-masks (``True`` = kept, CPU bool tensors shaped like the weights) removing the
    ``int(sparsity * n)`` smallest-magnitude prunable weights, globally or per tensor."""
    sparsity = check_sparsity(sparsity, scope)
    weights = {n: w.detach().to("cpu", torch.float32).abs().flatten() for n, w in prunable_weights(model).items()}
    if not weights:
        raise PlanError("the model has no Linear or convolution weights to prune")
    bad = next((n for n, w in weights.items() if not torch.isfinite(w).all()), None)
    if bad is not None:
        raise PlanError(f"weight {bad} holds NaN or infinite values; magnitude pruning needs finite weights")
    if scope == "layer":
        drops = {n: _drop_smallest(w, int(sparsity * w.numel())) for n, w in weights.items()}
    else:
        flat = torch.cat(list(weights.values()))
        drop = _drop_smallest(flat, int(sparsity * flat.numel()))
        drops, start = {}, 0
        for n, w in weights.items():
            drops[n], start = drop[start:start + w.numel()], start + w.numel()
    shapes = {n: w.shape for n, w in prunable_weights(model).items()}
    return {n: (~d).reshape(shapes[n]) for n, d in drops.items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero, in place, every weight entry whose mask is ``False`` (names as in ``named_parameters``)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, mask in masks.items():
        p = params.get(name)
        if p is None or p.shape != mask.shape:
            raise PlanError(f"mask {name} {tuple(mask.shape)} does not match a parameter of the model")
        p.masked_fill_(~mask.to(p.device), 0.0)


def attach_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Remember ``masks`` for ``model`` (read back by :func:`masks_of`); returns ``model``."""
    _MASKS[model] = {n: m.detach().to("cpu", torch.bool) for n, m in masks.items()}
    return model


def masks_from_zeros(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep-masks read from the zeros of the prunable weights (how a reloaded checkpoint gets them back)."""
    return {n: (w.detach() != 0).cpu() for n, w in prunable_weights(model).items()}


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The masks :func:`prune_unstructured` attached, else :func:`masks_from_zeros`."""
    masks = _MASKS.get(model)
    return dict(masks) if masks is not None else masks_from_zeros(model)


def prune_unstructured(model: nn.Module, sparsity: float, scope: str = "global") -> nn.Module:
    """A copy of ``model`` (its own class) with the smallest-magnitude prunable weights set to zero
    and its masks attached; ``model`` itself is not modified."""
    masks = magnitude_masks(model, sparsity, scope)
    out = copy.deepcopy(model)
    apply_masks(out, masks)
    return attach_masks(out, masks)


# -- sparse inference ---------------------------------------------------------------------------
class SparseLinear(nn.Module):
    """``nn.Linear`` with a CSR weight: ``y = (W_csr @ x^T)^T + b`` through ``torch.sparse.mm``.

    Inference only (no weight gradient); not storable in a checkpoint (save the dense model instead).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            self.register_buffer("weight", linear.weight.detach().to_sparse_csr())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        y = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"sparsity={1 - nnz / max(1, self.in_features * self.out_features):.3f}"


def sparse_inference(model: nn.Module, min_sparsity: float = 0.95) -> nn.Module:
    """A copy of ``model`` whose ``nn.Linear`` layers with at least ``min_sparsity`` zero weights are
    :class:`SparseLinear`; everything else stays dense. On the CPU ``bench/sparse.py`` measured, CSR
    beat the dense kernel for every Linear shape tried from 95% sparsity (some from 90%), and lost
    below 70%; convolutions (im2col + CSR) are left dense.

    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    >>> fast = sparse_inference(prune_unstructured(net, 0.96, scope="layer"))
    >>> [type(m).__name__ for m in fast]
    ['SparseLinear', 'SparseLinear']
    """
    if not (isinstance(min_sparsity, (int, float)) and 0.0 <= min_sparsity <= 1.0) or isinstance(min_sparsity, bool):
        raise PlanError(f"min_sparsity must be a number in [0, 1], got {min_sparsity!r}")
    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if type(mod) is not nn.Linear or not name:
            continue
        zeros = int((mod.weight == 0).sum())
        if mod.weight.numel() and zeros / mod.weight.numel() >= min_sparsity - 1e-12:
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, leaf, SparseLinear(mod))
    return out
