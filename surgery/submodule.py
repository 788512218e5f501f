"""Prune one submodule of a model in place (a detector's backbone, a segmentation encoder).

Whole models are often untraceable (a detector's data-dependent post-processing) while the part
worth pruning is not. ``capture_inputs`` runs the whole model once with a forward hook on the part
and records what it really receives; the part is traced and pruned alone on those inputs (its own
outputs keep their widths, so whatever consumes them still fits), and ``replaced`` returns a copy of
the whole model with the pruned part in its place. Calibration batches for data-driven methods go
through the whole model the same way (``sub_batches``).

Examples
--------
>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)))
>>> (x,) = capture_inputs(net, (torch.randn(1, 3, 12, 12),), "2")
>>> tuple(x.shape)
(1, 8, 10, 10)
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

from .dependency_graph.tracing import eval_mode
from .errors import PlanError

__all__ = ["get", "capture_inputs", "sub_batches", "replaced"]


def get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        known = [n for n, _ in model.named_children()]
        raise PlanError(f"the model has no submodule {name!r}; its children are: {', '.join(known) or 'none'}") from None


class _Stop(Exception):
    """Raised by the hook once the part's inputs are recorded: the rest of the model need not run."""


def capture_inputs(model: nn.Module, inputs: tuple, name: str) -> tuple:
    """The positional arguments ``model``'s submodule ``name`` receives when ``model(*inputs)`` runs
    (first call, detached; eval mode; the model's flags restored)."""
    part = get(model, name)
    seen: list[tuple] = []

    def hook(module, args, kwargs):
        if kwargs:
            raise PlanError(f"submodule {name!r} is called with keyword arguments ({', '.join(kwargs)}); "
                            f"only positional tensor inputs can be traced")
        seen.append(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        raise _Stop

    handle = part.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), eval_mode(model):
            model(*inputs)
    except _Stop:
        pass
    except PlanError:
        raise
    except Exception as exc:
        raise PlanError(f"running the model to find the inputs of {name!r} failed: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    finally:
        handle.remove()
    if not seen:
        raise PlanError(f"submodule {name!r} is not called when the model runs on the example inputs")
    if not all(isinstance(a, torch.Tensor) for a in seen[0]):
        raise PlanError(f"submodule {name!r} receives non-tensor arguments; only tensors can be traced")
    return seen[0]


def sub_batches(model: nn.Module, name: str, data, max_batches: int | None = None) -> Iterator[tuple]:
    """Each batch of the whole model's input mapped through ``model`` to the inputs of ``name``.

    A batch is the model's input (a tensor, or whatever its forward takes: a list of images for a
    detector) or an ``(input, labels)`` tuple with integer (or ``None``) labels; labels are dropped (they belong to the whole model's
    output). A tensor ``data`` is one batch.
    """
    items = [data] if isinstance(data, torch.Tensor) else data
    for i, item in enumerate(items):
        if max_batches is not None and i >= max_batches:
            return
        labels = item[1] if isinstance(item, tuple) and len(item) == 2 else False
        if labels is None or (isinstance(labels, torch.Tensor) and not labels.is_floating_point()):
            item = item[0]  # an (input, labels) pair; a list is the model's input itself (e.g. images)
        yield capture_inputs(model, (item,), name)


def replaced(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with submodule ``name`` replaced by ``new`` (the old part is not copied)."""
    old = get(model, name)
    return copy.deepcopy(model, {id(old): new})
