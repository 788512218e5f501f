"""Engine crash classes, each on a tiny model: argument normalisation (negative dims, keyword
arguments, negative tuple indices), a rule that raises, the Hugging Face attention reshape,
``nn.MultiheadAttention`` with ``kdim``/``vdim`` and cross-attention, and the aten front end's
``embedding`` / ``select``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import check_pruned_equals_masked  # noqa: E402

import surgery  # noqa: E402
from surgery import Reason  # noqa: E402
from surgery.dependency_graph.rules import module_rule  # noqa: E402


def _group_of(graph, module: str, param: str, dim: int):
    found = [g for g in graph.groups if any(m.module == module and m.param == param and m.dim == dim for m in g.members)]
    assert len(found) == 1, f"{module}.{param}[dim {dim}] is in {len(found)} groups"
    return found[0]


# ---------------------------------------------------------------------------------------------
# 1. arguments normalised once: negative dims, keyword arguments, negative tuple indices
# ---------------------------------------------------------------------------------------------


class SplitNet(nn.Module):
    """Linear(6 -> 8), split on the last dim into parts of 3 and 5 channels, one Linear per part."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a = nn.Linear(6, 8)
        self.b1 = nn.Linear(3, 4)
        self.b2 = nn.Linear(5, 4)

    def forward(self, x):
        y = self.a(x)
        how = self.how
        if how == "torch.split dim=-1, [-1]":
            parts = torch.split(y, [3, 5], dim=-1)
            p, q = parts[0], parts[-1]
        elif how == "Tensor.split(sizes, -1)[-2], [-1]":
            parts = y.split([3, 5], -1)
            p, q = parts[-2], parts[-1]
        elif how == "torch.split keywords only":
            p, q = torch.split(tensor=y, split_size_or_sections=[3, 5], dim=-1)
        elif how == "Tensor.split(split_size=..., dim=-1)":
            p, q = y.split(split_size=[3, 5], dim=-1)
        elif how == "torch.tensor_split(indices=(3,), dim=2)":
            p, q = torch.tensor_split(y, indices=(3,), dim=2)
        elif how == "Tensor.tensor_split((3,), -1)":
            p, q = y.tensor_split((3,), -1)
        else:
            raise ValueError(how)
        return self.b1(p) + self.b2(q)


SPLITS = [
    "torch.split dim=-1, [-1]",
    "Tensor.split(sizes, -1)[-2], [-1]",
    "torch.split keywords only",
    "Tensor.split(split_size=..., dim=-1)",
    "torch.tensor_split(indices=(3,), dim=2)",
    "Tensor.tensor_split((3,), -1)",
]


@pytest.mark.parametrize("how", SPLITS)
def test_split_negative_dim_and_keywords(how):
    model, x = SplitNet(how), torch.randn(2, 5, 6)
    graph = surgery.trace(model, x)
    assert sorted(g.size for g in graph.prunable_groups) == [3, 5]  # one group per part
    plan, pruned, _ = check_pruned_equals_masked(model, x, "l1", 0.5)
    assert tuple(pruned.a.weight.shape) == (5, 6)  # 3 -> 2 and 5 -> 3 channels
    assert tuple(pruned.b1.weight.shape) == (4, 2)
    assert tuple(pruned.b2.weight.shape) == (4, 3)


class ChunkNet(nn.Module):
    """Linear(6 -> 8), two equal parts on the last dim (chunk / tensor_split by count)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        y = self.a(x)
        if self.how == "torch.chunk(dim=-1)[-1]":
            parts = torch.chunk(y, 2, dim=-1)
        elif self.how == "Tensor.chunk(2, -1)[-1]":
            parts = y.chunk(2, -1)
        elif self.how == "torch.tensor_split(sections=2, dim=-1)":
            parts = torch.tensor_split(y, sections=2, dim=-1)
        else:
            raise ValueError(self.how)
        return self.b(parts[0]) * self.b(parts[-1])


@pytest.mark.parametrize("how", ["torch.chunk(dim=-1)[-1]", "Tensor.chunk(2, -1)[-1]", "torch.tensor_split(sections=2, dim=-1)"])
def test_chunk_negative_dim_and_index(how):
    model, x = ChunkNet(how), torch.randn(2, 5, 6)
    # both halves feed the same Linear, so half i and half j go together: one group of 4
    graph = surgery.trace(model, x)
    assert [g.size for g in graph.prunable_groups] == [4]
    _, pruned, _ = check_pruned_equals_masked(model, x, "l1", 0.5)
    assert tuple(pruned.a.weight.shape) == (4, 6)
    assert tuple(pruned.b.weight.shape) == (3, 2)


class SelectNet(nn.Module):
    """Linear(6 -> 8) on (B, L, C); the last position taken with ``select(1, -1)``; Linear(8 -> 3)."""

    def __init__(self, method: bool):
        super().__init__()
        self.method = method
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        y = self.a(x)
        y = y.select(-2, -1) if self.method else torch.select(y, dim=1, index=-1)
        return self.b(y)


@pytest.mark.parametrize("method", [False, True], ids=["torch.select", "Tensor.select"])
def test_select_passes_channels(method):
    model, x = SelectNet(method), torch.randn(2, 5, 6)
    _, pruned, _ = check_pruned_equals_masked(model, x, "l1", 0.5)
    assert tuple(pruned.a.weight.shape) == (4, 6)
    assert tuple(pruned.b.weight.shape) == (3, 4)


def test_unbind_and_cat_negative_dims():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(16, 3)

        def forward(self, x):  # x: (B, 2, 6)
            first, second = self.a(x).unbind(dim=-2)
            return self.b(torch.cat([first, second], dim=-1))

    model, x = Net(), torch.randn(3, 2, 6)
    _, pruned, _ = check_pruned_equals_masked(model, x, "l1", 0.5)
    assert tuple(pruned.a.weight.shape) == (4, 6)
    assert tuple(pruned.b.weight.shape) == (3, 8)


# ---------------------------------------------------------------------------------------------
# 2. a rule that raises stops its node's channels; the trace goes on
# ---------------------------------------------------------------------------------------------


class Exploding(nn.Linear):
    """A Linear subclass whose (test-only) rule couples a little, then raises."""


@module_rule(Exploding)
def _exploding_rule(ctx):
    ctx.identity(ctx.sp(ctx.input, -1), ctx.p("weight", 1))  # a coupling made before the failure
    raise ValueError("boom: cannot explain this node\nsecond line")


class ExplodingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(6, 8)
        self.boom = Exploding(8, 8)
        self.post = nn.Linear(8, 3)
        self.side1 = nn.Linear(6, 10)
        self.side2 = nn.Linear(10, 3)

    def forward(self, x):
        return self.post(self.boom(self.pre(x))) + self.side2(torch.relu(self.side1(x)))


def test_raising_rule_stops_its_node_and_trace_goes_on():
    model, x = ExplodingNet(), torch.randn(2, 6)
    graph = surgery.trace(model, x, leaf_modules=[Exploding])
    node = next(n for n in graph.fx_graph.nodes if n.target == "boom")
    expected = f"{node.format_node()}: rule raised ValueError: boom: cannot explain this node"
    for module, param, dim in (("pre", "weight", 0), ("boom", "weight", 1), ("boom", "weight", 0), ("post", "weight", 1)):
        g = _group_of(graph, module, param, dim)
        assert not g.prunable and g.reason is Reason.UNSUPPORTED_OP
        assert g.reason_detail.endswith(f"({expected})"), g.reason_detail
    side = _group_of(graph, "side1", "weight", 0)
    assert side.prunable and side.size == 10
    _, pruned, _ = check_pruned_equals_masked(model, x, "l1", 0.5, leaf_modules=[Exploding])
    assert tuple(pruned.side1.weight.shape) == (5, 6)
    assert tuple(pruned.side2.weight.shape) == (3, 5)
    assert tuple(pruned.pre.weight.shape) == (8, 6)
    assert tuple(pruned.boom.weight.shape) == (8, 8)
