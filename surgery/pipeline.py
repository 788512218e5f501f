"""One-call pruning: trace once, plan, apply."""

from __future__ import annotations

from torch import nn

from .dependency_graph import trace as trace_graph
from .dependency_graph.tracing import normalize_inputs
from .plan import check_ratio, plan_from_graph
from .rewrite import apply_to_graph

__all__ = ["prune"]


def prune(model: nn.Module, example_inputs, method: str = "l1", ratio: float = 0.5, data=None, *, mode: str = "prune", **options) -> nn.Module:
    """Plan with ``method`` at ``ratio`` and return the pruned model (``model`` is not modified).

    Examples
    --------
    >>> import torch, surgery
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    >>> small = surgery.prune(net, torch.randn(1, 3, 16, 16), method="l1", ratio=0.5)
    >>> small(torch.randn(1, 3, 16, 16)).shape, net[0].out_channels
    (torch.Size([1, 4, 12, 12]), 8)
    """
    check_ratio(ratio)
    leaf = options.get("leaf_modules", ())
    graph = trace_graph(model, normalize_inputs(example_inputs), leaf)
    p = plan_from_graph(model, graph, method, ratio, data, **options)
    return apply_to_graph(graph, p, mode)
