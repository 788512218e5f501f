"""What surgery remembers about the models it returns, without attaching anything to them.

:func:`surgery.apply` records the example inputs a result was traced and checked with, so that
``surgery.save(result, path)`` can store and check the result's own class without being handed the
inputs again. Entries die with the model (a weak dictionary keyed by the module object).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

_INPUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def remember_inputs(model: nn.Module, inputs) -> None:
    """Record ``inputs`` (a tensor or a tuple of tensors) as ``model``'s example inputs."""
    items = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    if items and all(isinstance(t, torch.Tensor) for t in items):
        _INPUTS[model] = tuple(t.detach() for t in items)


def example_inputs_of(model: nn.Module):
    """The example inputs recorded for ``model`` by :func:`remember_inputs`, or ``None``."""
    return _INPUTS.get(model)
