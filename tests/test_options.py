"""Strict options, plans that replay identically, mismatched plans that fail naming the group,
channel rounding and MACs targets."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import surgery
from helpers import check_pruned_equals_masked, rel_err
from surgery.errors import PlanError
from surgery.plan import Plan

X64 = torch.randn(1, 3, 64, 64)


class Block(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.b1 = Block(width)
        self.b2 = Block(width)
        self.head = nn.Conv2d(width, 4, 1)

    def forward(self, x):
        return self.head(self.b2(self.b1(self.stem(x))))


def test_unknown_plan_option_is_an_error_naming_the_known_ones():
    net, x = Net().eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(PlanError, match=r"unknown option 'polcy' for method 'l1' \(did you mean 'policy'\?\); known options: .*round_to"):
        surgery.plan(net, x, polcy="global")
    with pytest.raises(PlanError, match=r"unknown option 'seeed' for method 'random' \(did you mean 'seed'\?\)"):
        surgery.prune(net, x, method="random", seeed=3)


@pytest.mark.parametrize("kw, msg", [
    ({"policy": "glob"}, "unknown policy 'glob'; known policies: local, global"),
    ({"round_to": 0}, "round_to must be a positive integer, got 0"),
    ({"target_macs": 1.5}, r"target_macs is the fraction of MACs to keep, in \(0, 1\], got 1.5"),
    ({"normalize": "max"}, "unknown normalize 'max'"),
    ({"seed": "abc"}, "option 'seed' of method 'random' must be a int, got 'abc'"),
])
def test_bad_option_values_are_errors(kw, msg):
    with pytest.raises(PlanError, match=msg):
        surgery.plan(Net().eval(), torch.randn(1, 3, 8, 8), method="random", **kw)


def test_plan_records_every_option_and_replays_identically():
    net, x = Net().eval(), torch.randn(1, 3, 8, 8)
    p = surgery.plan(net, x, method="random", ratio=0.4, seed=7, policy="global", layer_ratios={"b2.*": 0.25},
                     leaf_modules=[Block], round_to=2)
    assert p.options["seed"] == 7 and p.options["policy"] == "global" and p.options["round_to"] == 2
    assert p.options["layer_ratios"] == {"b2.*": 0.25}
    assert p.leaf_modules == ("b1", "b2")  # classes are recorded by qualified name
    again = surgery.plan(net, x, method=p.method, ratio=p.ratio, **p.options)
    assert again == p
    back = Plan.from_json(p.to_json())
    assert back == p
    with torch.no_grad():
        assert torch.equal(surgery.apply(net, back)(x), surgery.apply(net, p)(x))


def test_leaf_module_classes_replay():
    """The issue's repro: plan with a leaf class, then apply the plan (it used to fail on group counts)."""
    net, x = Net().eval(), torch.randn(1, 3, 8, 8)
    p = surgery.plan(net, x, method="l1", ratio=0.5, leaf_modules=[Block])
    pruned = surgery.apply(net, p)
    assert pruned(x).shape == net(x).shape


def test_mismatched_plan_fails_naming_the_group():
    x = torch.randn(1, 3, 8, 8)
    p = surgery.plan(Net(8).eval(), x, method="l1", ratio=0.5)

    same_sizes = Net(8).eval()
    same_sizes.add_module("extra", nn.Identity())
    assert surgery.apply(same_sizes, p)(x).shape == (1, 4, 8, 8)  # an unused module changes nothing
    wider = Net(12).eval()
    with pytest.raises(PlanError, match=r"group 1 was '8:stem' when the plan was made, this model has '12:stem'"):
        surgery.apply(wider, p)


def test_mismatch_with_equal_sizes_is_caught_by_producers():
    """Sizes alone match, but the channels come from another layer: never prune the wrong channels."""

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Conv2d(3, 8, 3, padding=1)
            self.b1, self.b2 = Block(8), Block(8)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(self.b2(self.b1(self.first(x))))

    x = torch.randn(1, 3, 8, 8)
    p = surgery.plan(Net(8).eval(), x, method="l1", ratio=0.5)
    with pytest.raises(PlanError, match=r"group 0 was '3:stem' when the plan was made, this model has '3:first'"):
        surgery.apply(Other().eval(), p)


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_round_to_gives_multiples_and_stays_exact(name):
    model = torchvision.models.get_model(name).eval()
    plan, pruned, _ = check_pruned_equals_masked(model, X64, "l1", 0.37, round_to=8)
    assert plan.groups
    for g in plan.groups:
        assert g.size < 8 or len(g.keep) % 8 == 0, (g.label, g.size, len(g.keep))


@pytest.mark.parametrize("name, kwargs, x", [
    ("resnet18", {}, X64),
    ("mobilenet_v2", {}, X64),
    ("vit_b_16", {"image_size": 64}, X64),
])
@pytest.mark.parametrize("target", [0.5])
def test_target_macs_lands_within_two_percent(name, kwargs, x, target):
    model = torchvision.models.get_model(name, **kwargs).eval()
    base = surgery.stats(model, x).macs
    p = surgery.plan(model, x, method="l1" if name != "vit_b_16" else "group-l1", target_macs=target)
    got = surgery.stats(surgery.apply(model, p), x).macs / base
    assert abs(got - target) <= 0.02, got
    assert p.policy == "global" and p.options["target_macs"] == target


def test_target_macs_local_policy_bisects_the_uniform_ratio():
    model = torchvision.models.resnet18().eval()
    p = surgery.plan(model, X64, method="l1", target_macs=0.6, policy="local")
    got = surgery.stats(surgery.apply(model, p), X64).macs / surgery.stats(model, X64).macs
    assert abs(got - 0.6) <= 0.02 and p.policy == "local" and 0 < p.ratio < 1


def test_faithful_l1_scores_the_producing_filter_only():
    """Li et al.: score = sum |w| of the producer's filter; BN and the next layer do not matter."""
    net, x = Net().eval(), torch.randn(1, 3, 8, 8)
    graph = surgery.trace(net, x)
    from surgery.methods import ScoreContext, get_method

    groups = [g for g in graph.groups if g.prunable]
    ctx = ScoreContext(net, graph, groups)
    scores = get_method("l1").fn(ctx).scores
    g = next(g for g in groups if g.producers[:1] == ["b1.conv"])
    want = net.b1.conv.weight.detach().abs().sum(dim=(1, 2, 3)).double().numpy()
    assert rel_err(torch.from_numpy(scores[g.id]), torch.from_numpy(want)) < 1e-12
    with torch.no_grad():  # scaling the next layer and the BN must not change Li scores
        net.b2.conv.weight.mul_(10)
        net.b1.bn.weight.mul_(3)
    again = get_method("l1").fn(ScoreContext(net, graph, groups)).scores
    assert (again[g.id] == scores[g.id]).all()
    group_scores = get_method("group-l1").fn(ScoreContext(net, graph, groups))
    assert not (group_scores[g.id] == scores[g.id]).all()


def test_l1_leaves_groups_without_a_producer_whole_with_a_reason():
    gru = nn.Sequential(nn.Linear(8, 6))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(6, 8, batch_first=True)
            self.pre, self.fc = gru[0], nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.rnn(self.pre(x))[0])

    p = surgery.plan(Net().eval(), torch.randn(2, 5, 8), method="l1", ratio=0.5)
    assert any("no conv, linear or embedding produces these channels" in why for why in p.notes.values())


def test_bn_gate_removes_the_smallest_gammas_globally_without_normalisation():
    net, x = Net().eval(), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        net.b1.bn.weight.copy_(torch.linspace(1, 2, 8))  # every b1 channel beats every b2 channel
        net.b2.bn.weight.copy_(torch.linspace(0.01, 0.5, 8))
        net.b2.bn.weight[5] = -0.001  # |gamma| is what counts
    p = surgery.plan(net, x, method="bn-gate", ratio=0.25, policy="global")
    pruned = surgery.apply(net, p)
    assert pruned.b1.conv.out_channels == 8 and pruned.b2.conv.out_channels == 4
    (g,) = p.groups
    assert g.removed == [0, 1, 2, 5]
    assert any("no BatchNorm" in why for why in p.notes.values())  # the stem group has no gate
    # with mean normalisation both groups lose channels: the ranking is no longer slimming's
    p_mean = surgery.plan(net, x, method="bn-gate", ratio=0.25, policy="global", normalize="mean")
    assert p_mean.groups != p.groups
