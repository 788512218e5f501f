"""Pruning from Scratch by its checks (METHODS.md 3.6): the regulariser's gradient, frozen weights,
gates in [0, 1], the MACs target, and gated == pruned with the gates folded."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

import surgery
from helpers import assert_same_state, rel_err, state_snapshot
from surgery.methods.from_scratch import GateSet, regulariser


class VGGish(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.f = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                               nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                               nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.f(x).mean((2, 3)))


def _data(n=128):
    from surgery.calibration.data import digits

    x, y = digits((1, 1, 8, 8))
    return x[:n], y[:n]


def test_regulariser_gradient_is_exact():
    """P1: d/dg lambda (mean|g| - r)^2 = 2 lambda (mean|g| - r) sign(g) / N (float64)."""
    g = (torch.rand(50, dtype=torch.float64) - 0.3).requires_grad_()
    lam, r = 0.5, 0.2
    regulariser(g, lam, r).backward()
    want = 2 * lam * (g.detach().abs().mean() - r) * torch.sign(g.detach()) / g.numel()
    assert torch.allclose(g.grad, want, rtol=0, atol=1e-15)


def test_one_step_with_frozen_weights_changes_only_gates_and_they_stay_in_0_1():
    """P2 and P4's clamp, on the gate set the method uses."""
    model = VGGish()
    graph = surgery.trace(model, torch.randn(1, 1, 8, 8))
    groups = [g for g in graph.groups if g.prunable]
    net = copy.deepcopy(model)
    for p in net.parameters():
        p.requires_grad_(False)
    gates = GateSet(net, groups)
    before = {k: v.clone() for k, v in net.named_parameters()}
    opt = torch.optim.Adam(gates.parameters(), lr=0.5)
    x, y = _data(32)
    net.train()
    for _ in range(3):
        loss = nn.functional.cross_entropy(net(x), y) + regulariser(gates.all(), 0.5, 0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for g in gates.gates.values():
                g.clamp_(0, 1)
        assert all(torch.equal(v, dict(net.named_parameters())[k]) for k, v in before.items())
        assert bool(((gates.all() >= 0) & (gates.all() <= 1)).all())
    assert not torch.equal(gates.all(), torch.ones_like(gates.all()))


def test_method_meets_a_macs_target_and_leaves_the_model_alone():
    """P3: MACs within one channel's granularity of the target (the closest plan of the bisection);
    the user's model untouched."""
    model = VGGish().eval()
    snap = state_snapshot(model)
    x = torch.randn(1, 1, 8, 8)
    plan = surgery.plan(model, x, "from-scratch", data=_data(), target_macs=0.5, epochs=2)
    base = surgery.stats(model, x).macs
    got = surgery.stats(surgery.apply(model, plan), x).macs / base
    one_channel = 9 * 64 * (8 + 16)  # the costliest channel: f.3's filter (8 inputs) and its column in f.6 (16 outputs)
    assert abs(got - 0.5) <= one_channel / base and plan.policy == "global"
    assert_same_state(model, snap)
    assert plan.options["epochs"] == 2 and plan.options["lam"] == 0.5


def test_gated_model_equals_the_pruned_model_with_gates_folded():
    """P4: zeroing the pruned channels' gates (keeping the others) computes what the pruned model
    with the kept gates folded into the consumers computes (ReLU after the gate)."""
    model = VGGish().eval()
    x = torch.randn(1, 1, 8, 8)
    data = _data()
    res = surgery.pipeline.run(model, x, "from-scratch", 0.5, data=data, epochs=2, fold_gates=True, output="graph")
    graph = res.graph
    # rebuild the gates the plan scored: run the method again deterministically and zero the pruned ones
    from surgery.methods import ScoreContext, get_method
    from surgery.calibration import Calibration

    groups = [g for g in graph.groups if g.prunable]
    scores = get_method("from-scratch").fn(ScoreContext(model, graph, groups, Calibration(data)), epochs=2, lr=0.01, lam=0.5,
                                           r=0.2, scope="inner", fold_gates=True, seed=0).scores
    gated = copy.deepcopy(model)
    gs = GateSet(gated, [g for g in groups if g.id in scores])
    with torch.no_grad():
        for gp in res.plan.groups:
            v = torch.as_tensor(scores[gp.id], dtype=torch.float32)
            v[torch.as_tensor(gp.removed)] = 0
            gs.gates[str(gp.id)].copy_(v)
        for gid, v in scores.items():
            if gid not in {gp.id for gp in res.plan.groups}:
                gs.gates[str(gid)].copy_(torch.as_tensor(v, dtype=torch.float32))
    xb = data[0][:16]
    with torch.no_grad():
        assert rel_err(res.model(xb), gated.eval()(xb)) < 1e-4
