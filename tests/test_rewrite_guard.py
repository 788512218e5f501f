"""A plan the rewrite cannot honour is never made: the planner applies its plan, finds the groups at
fault and leaves them whole with the rewrite's reason."""

from __future__ import annotations

import torch
from torch import nn

import surgery
from helpers import check_pruned_equals_masked
from surgery.dependency_graph import Reason
from surgery.dependency_graph.rules import module_rule


class Unfixable(nn.Module):
    """A per-channel scale whose (test-only) rule couples its channels but cannot rewrite itself."""

    def __init__(self, c: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1)


def _cannot_fix(module, ctx):
    raise ValueError("this layer's width is baked into a kernel")


@module_rule(Unfixable, fix=_cannot_fix)
def _unfixable(ctx):
    x = ctx.node.args[0]
    for d in range(4):
        ctx.identity(ctx.sp(x, d), ctx.out(d))
    ctx.identity(ctx.p("scale", 0), ctx.out(1))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.u, self.c2 = nn.Conv2d(3, 8, 3), Unfixable(8), nn.Conv2d(8, 8, 3)
        self.c3 = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(self.u(self.c1(x)))))


def test_group_the_rewrite_cannot_honour_is_left_whole_with_the_reason():
    net, x = Net().eval(), torch.randn(1, 3, 12, 12)
    leaf = [Unfixable]
    graph = surgery.trace(net, x, leaf_modules=("u",))
    assert sum(g.prunable for g in graph.groups) == 2  # both look prunable before the rewrite is tried
    plan, pruned, _ = check_pruned_equals_masked(net, x, "group-l1", 0.5, leaf_modules=leaf)
    assert [g.label.split(" ")[0] for g in plan.groups] == ["c2"]  # only the group after the bad layer
    assert pruned.c1.out_channels == 8 and pruned.c2.out_channels == 4
    from surgery.pipeline import run

    res = run(net, x, "group-l1", 0.5, leaf_modules=leaf, mode=None)
    bad = [g for g in res.graph.groups if g.reason is Reason.NOT_REWRITABLE]
    assert len(bad) == 1 and "this layer's width is baked into a kernel" in bad[0].why and "u" in bad[0].why
    # a module rule makes its module a leaf: no leaf_modules needed
    assert [n.target for n in surgery.trace(net, x).fx_graph.nodes if n.op == "call_module"] == ["c1", "u", "c2", "c3"]
