"""The torch.export front end: used where fx symbolic tracing fails, same rules, same law."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import surgery
from surgery.errors import TraceError
from helpers import check_pruned_equals_masked


class ShapeBranch(nn.Module):
    """Python control flow on a shape: fx cannot trace it, torch.export specialises it."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c3 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6 * 8 * 8, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x)))
        if y.shape[-1] > 4:
            y = self.dw(y)
        a, b = y.split([3, 5], dim=1)
        y = torch.cat([b, a], 1)
        return self.fc(self.c3(y).flatten(1))


class DataDependent(nn.Module):
    """Control flow on tensor *values*: neither front end can trace it."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.c(x)
        return x


def test_fx_fails_and_export_takes_over():
    m, x = ShapeBranch().eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(TraceError):
        surgery.dependency_graph.tracing._symbolic_trace(m, ())
    graph = surgery.trace(m, x)
    assert graph.frontend == "export"
    sizes = sorted((g.size, g.prunable) for g in graph.groups)
    # split [3, 5] of the depthwise output makes two groups; c3's outputs a third; input/output fixed
    assert sizes == [(3, False), (3, True), (5, False), (5, True), (6, True)]


def test_export_graph_prunes_exactly():
    m, x = ShapeBranch().eval(), torch.randn(2, 3, 8, 8)
    _, pruned, _ = check_pruned_equals_masked(m, x, ratio=0.5)
    targets = {str(n.target) for n in pruned.graph.nodes if n.op == "call_function"}
    assert "aten.split_with_sizes.default" in targets
    split = next(n for n in pruned.graph.nodes if str(n.target) == "aten.split_with_sizes.default")
    assert list(split.args[1]) == [2, 3]  # int(0.5 * 3) and int(0.5 * 5) removed
    groups = [n.args[6] for n in pruned.graph.nodes if str(n.target) == "aten.conv2d.default" and len(n.args) > 6]
    assert groups == [5]  # the depthwise conv keeps 2 + 3 channels, one group each


def test_untraceable_by_both_front_ends_names_the_line():
    with pytest.raises(TraceError, match=r"test_export_frontend.py:\d+ `if x.sum\(\) > 0:`.*leaf"):
        surgery.trace(DataDependent(), torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize("method", ["apoz", "taylor", "thinet"])
def test_data_methods_on_the_export_front_end_take_any_batch_size(method):
    """The export graph is fixed to the example's batch (1 here); calibration batches of 8 are re-cut."""
    from helpers import check_pruned_equals_masked

    model, x = ShapeBranch().eval(), torch.randn(1, 3, 8, 8)
    data = (torch.randn(16, 3, 8, 8), torch.randint(0, 2, (16,)))
    loss = (lambda out, y: out.float().mean(dim=tuple(range(1, out.dim()))).sum()) if method == "taylor" else None
    plan, _, _ = check_pruned_equals_masked(model, x, method, 0.5, data=data, loss=loss, output="graph")
    assert plan.groups and surgery.trace(model, x).frontend == "export"


def test_hand_written_layer_norm_is_cross_channel_on_the_export_front_end():
    """aten std / clamp_min map to the same rules as their torch functions."""

    class LN(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            if x.shape[-1] > 4:  # Python control flow on a shape: fx cannot trace it
                x = x * 1.0
            h = self.a(x)
            h = (h - h.mean(-1, keepdim=True)) / h.std(-1, keepdim=True).clamp_min(1e-5)
            return self.b(h)

    g = surgery.trace(LN().eval(), torch.randn(2, 3, 8))
    (hidden,) = [x for x in g.groups if x.size == 16]
    assert g.frontend == "export" and hidden.prunable and "std over dim 2" in hidden.cross_channel
