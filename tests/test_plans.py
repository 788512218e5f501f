"""Plan-level checks: a dead-channel oracle for l1, ratio 0 and ratio validation, JSON round trips,
and tied weights."""

from __future__ import annotations

import dataclasses
import operator
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import check_pruned_equals_masked, rel_err  # noqa: E402

import surgery  # noqa: E402
from surgery.errors import PlanError  # noqa: E402
from surgery.plan import GroupPlan, Plan  # noqa: E402
from zoo_models import BY_NAME  # noqa: E402
from zoo_models import build_case as _build  # noqa: E402
from zoo_models import forward as _out  # noqa: E402

# ---------------------------------------------------------------------------------------------
# dead-channel oracle
# ---------------------------------------------------------------------------------------------


class DeadNet(nn.Module):
    """conv-bn-relu-conv-bn-relu -> global pool -> linear (two prunable groups of 8 channels)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return self.fc(y.mean((2, 3)))


def _randomize_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)


def test_dead_channel_oracle():
    torch.manual_seed(0)
    model = DeadNet().eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 8, 8)
    graph = surgery.trace(model, x)
    prunable = graph.prunable_groups
    assert len(prunable) == 2 and all(g.size == 8 for g in prunable)
    dead = {prunable[0].id: [1, 5, 6], prunable[1].id: [0, 3, 7]}
    k = 3

    # zero every member slice of the dead channels (parameters and buffers) in a copy
    zeroed = DeadNet().eval()
    zeroed.load_state_dict(model.state_dict())
    with torch.no_grad():
        for g in prunable:
            for m in g.members:
                t = operator.attrgetter(m.name)(zeroed)
                idx = m.indices[np.isin(m.units, dead[g.id])]
                t.index_fill_(m.dim, torch.from_numpy(idx), 0.0)
    y_zeroed = _out(zeroed, x)

    # a hand-made plan removing exactly the dead channels: masking == zeroing
    hand = surgery.plan(model, x, ratio=0.0)
    hand = dataclasses.replace(hand, groups=tuple(
        GroupPlan(gid, 8, tuple(i for i in range(8) if i not in units), "") for gid, units in sorted(dead.items())
    ))
    y_masked = _out(surgery.apply(model, hand, mode="mask"), x)
    assert rel_err(y_masked, y_zeroed) < 1e-5
    assert rel_err(_out(surgery.apply(model, hand), x), y_zeroed) < 1e-5

    # l1 at ratio k/size on the zeroed model removes exactly the zeroed channels
    plan = surgery.plan(zeroed, x, method="l1", ratio=k / 8)
    assert {g.id: g.removed for g in plan.groups} == dead
    pruned = surgery.apply(zeroed, plan)
    assert pruned.conv1.weight.shape == (5, 3, 3, 3) and pruned.conv2.weight.shape == (5, 5, 3, 3)
    assert pruned.fc.weight.shape == (5, 5)
    assert rel_err(_out(pruned, x), y_zeroed) < 1e-5


# ---------------------------------------------------------------------------------------------
# plan-level checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["conv2d", "residual_block", "multihead_attention", "lstm_2layer", "channel_shuffle"])
def test_ratio_zero_removes_nothing(name):
    model, x = _build(BY_NAME[name])
    plan = surgery.plan(model, x, ratio=0.0)
    assert plan.groups == () and plan.n_removed == 0
    pruned = surgery.apply(model, plan)
    assert sum(p.numel() for p in pruned.parameters()) == sum(p.numel() for p in model.parameters())
    assert torch.equal(_out(pruned, x), _out(model, x))


@pytest.mark.parametrize("ratio", [-0.1, 1.0])
def test_ratio_validation(ratio):
    model, x = _build(BY_NAME["conv2d"])
    with pytest.raises(PlanError, match="ratio"):
        surgery.plan(model, x, ratio=ratio)
    with pytest.raises(PlanError, match="ratio"):
        surgery.prune(model, x, ratio=ratio)


@pytest.mark.parametrize("name", ["residual_block", "split_unequal", "multihead_attention", "gru", "grouped_conv_g4"])
def test_plan_json_round_trip(name):
    model, x = _build(BY_NAME[name])
    plan = surgery.plan(model, x, ratio=0.5, skip_cross_channel=True)
    back = Plan.from_json(plan.to_json())
    assert back == plan
    assert Plan.from_json(plan.to_json(indent=2)) == plan
    a, b = surgery.apply(model, plan), surgery.apply(model, back)
    assert torch.equal(_out(a, x), _out(b, x))
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


class TiedWeights(nn.Module):
    """One Linear weight used by two modules (weight tying): both names are sliced alike."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8, bias=False)
        self.b = nn.Linear(6, 8, bias=False)
        self.b.weight = self.a.weight
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.a(x)) + torch.relu(self.b(x * 2)))


def test_tied_weights_are_pruned_alike():
    torch.manual_seed(0)
    model, x = TiedWeights().eval(), torch.randn(4, 6)
    _, pruned, _ = check_pruned_equals_masked(model, x, ratio=0.5)
    assert pruned.a.weight.shape == (4, 6)
    assert torch.equal(pruned.a.weight, pruned.b.weight)


# ---------------------------------------------------------------------------------------------
# policies: global ranking and per-layer ratios
# ---------------------------------------------------------------------------------------------


def _dead_in_first_group(dead_units: list[int]) -> tuple[nn.Module, torch.Tensor, list]:
    """DeadNet whose first prunable group has every slice of ``dead_units`` zeroed."""
    torch.manual_seed(1)
    model = DeadNet().eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 8, 8)
    groups = surgery.trace(model, x).prunable_groups
    with torch.no_grad():
        for m in groups[0].members:
            t = operator.attrgetter(m.name)(model)
            t.index_fill_(m.dim, torch.as_tensor(m.indices[np.isin(m.units, dead_units)]), 0.0)
    return model, x, groups


def test_global_policy_takes_the_weakest_channels_across_groups():
    """Four dead channels in one group, none in the other: a global 25% cut (4 of 16) takes exactly
    the dead ones, where the local policy takes two from each group."""
    model, x, groups = _dead_in_first_group([0, 2, 4, 6])
    glob = surgery.plan(model, x, method="l1", ratio=0.25, policy="global")
    assert {g.id: g.removed for g in glob.groups} == {groups[0].id: [0, 2, 4, 6]}
    local = surgery.plan(model, x, method="l1", ratio=0.25)
    assert sorted(len(g.removed) for g in local.groups) == [2, 2]
    assert set(local.removed_units()[groups[0].id]) <= {0, 2, 4, 6}
    pruned = surgery.apply(model, glob)
    assert pruned.conv1.out_channels == 4 and pruned.conv2.out_channels == 8
    assert rel_err(_out(pruned, x), _out(model, x)) < 1e-5  # only dead channels went


def test_global_policy_keeps_one_channel_per_group():
    model, x, groups = _dead_in_first_group(list(range(8)))  # a whole group scores zero
    p = surgery.plan(model, x, method="l1", ratio=0.9, policy="global")
    assert p.n_removed == int(0.9 * 16)
    assert all(len(g.keep) >= 1 for g in p.groups)


def test_layer_ratios_override_the_default_for_matching_modules():
    model, x, groups = _dead_in_first_group([])
    p = surgery.plan(model, x, method="l1", ratio=0.5, layer_ratios={"conv2": 0.75})
    removed = {g.id: len(g.removed) for g in p.groups}
    by_module = {g.label.split(" ")[0]: removed[g.id] for g in groups}
    assert by_module == {"conv1": 4, "conv2": 6}


def test_bad_policy_and_layer_ratio_are_refused():
    model, x, _ = _dead_in_first_group([])
    with pytest.raises(PlanError, match="unknown policy 'best'"):
        surgery.plan(model, x, policy="best")
    with pytest.raises(PlanError, match="ratio for 'conv2'"):
        surgery.plan(model, x, layer_ratios={"conv2": 1.5})
