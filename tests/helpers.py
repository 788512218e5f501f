"""The one invariant helper every zoo and property test uses."""

from __future__ import annotations

import torch
from torch import nn

import surgery
from surgery.module_tree import output_tensors
from surgery.pipeline import run
from surgery.rewrite import apply_to_graph


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert now[k].shape == v.shape and torch.equal(now[k], v), f"user's model changed at {k}"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))




def check_pruned_equals_masked(model: nn.Module, x, method: str = "group-l1", ratio: float = 0.5, tol: float = 1e-4,
                               expect_fewer_params: bool = True, **options):
    """Plan (skipping cross-channel groups), apply in both modes, and assert the core invariants.

    * output shapes equal the original's
    * pruned == masked (relative error < tol) for every output tensor
    * fewer parameters after pruning (when any group was pruned and ``expect_fewer_params``)
    * the user's model is unchanged, and the pruned model can be traced again
    Returns ``(plan, pruned, masked)``.
    """
    model = model.eval()
    inputs = x if isinstance(x, tuple) else (x,)
    before = state_snapshot(model)
    options.setdefault("skip_cross_channel", True)
    result = run(model, inputs, method, ratio, **options)
    plan, pruned = result.plan, result.model
    masked = apply_to_graph(result.graph, plan, mode="mask")
    with torch.no_grad():
        y0, y1, y2 = model(*inputs), pruned(*inputs), masked(*inputs)
    for a, b, c in zip(output_tensors(y0), output_tensors(y1), output_tensors(y2), strict=True):
        assert b.shape == a.shape, f"output shape changed: {tuple(a.shape)} -> {tuple(b.shape)}"
        assert rel_err(b, c) < tol, f"pruned != masked: rel err {rel_err(b, c):.2e}"
    if plan.groups and expect_fewer_params:
        assert n_params(pruned) < n_params(model)
    assert_same_state(model, before)
    surgery.trace(pruned, inputs)  # the result is itself a traceable model
    return plan, pruned, masked
