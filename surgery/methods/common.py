"""Helpers for methods: reading a group's parameter slices."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..dependency_graph.group import Group

__all__ = ["member_tensor", "member_reduce"]


def member_tensor(model: nn.Module, owner: str, name: str) -> torch.Tensor | None:
    mod = model.get_submodule(owner) if owner else model
    t = getattr(mod, name, None)
    return t if isinstance(t, torch.Tensor) else None


def member_reduce(model: nn.Module, group: Group, reduce: Callable, params_only: bool = True) -> np.ndarray:
    """Sum over the group's members of ``reduce(tensor, other_dims)`` scattered onto group channels.

    ``reduce`` maps a parameter to a 1-D tensor along the member's dim (e.g. the L1 norm of each slice).
    """
    total = np.zeros(group.size, dtype=np.float64)
    with torch.no_grad():
        for m in group.members:
            mod = model.get_submodule(m.module) if m.module else model
            if params_only and m.param not in dict(mod.named_parameters(recurse=False)):
                continue
            t = member_tensor(model, m.module, m.param)
            if t is None or not t.is_floating_point():
                continue
            dims = [d for d in range(t.dim()) if d != m.dim]
            per_index = reduce(t.detach().float(), dims).cpu().double().numpy()
            np.add.at(total, m.units, per_index[m.indices])
    return total
