"""Centripetal SGD by its defining properties (METHODS.md 1.8): the within-cluster deviation decays
as (1 - lr (eta + eps))^(2t) whatever the data; merging identical clusters changes nothing while
dropping instead of summing does; end to end, merge after centripetal training keeps the logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import surgery
from helpers import rel_err
from surgery.train.csgd import Centripetal, cluster, deviation, even_clusters, merge_matrix, merge_plan


class Net(nn.Module):
    """stem -> BN -> ReLU -> a residual block (inner group + stream) -> pool -> fc."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c1, self.bn1 = nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c)
        self.c2, self.bn2 = nn.Conv2d(2 * c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        s = torch.relu(self.bn0(self.stem(x)))
        s = torch.relu(s + self.bn2(self.c2(torch.relu(self.bn1(self.c1(s))))))
        return self.fc(s.mean((2, 3)))


def _setup(seed=0):
    torch.manual_seed(seed)
    net = Net().double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    graph = surgery.trace(net, x)
    groups = [g for g in graph.groups if g.prunable]
    return net, x, graph, groups


def test_merge_and_decay_matrices():
    cl = even_clusters(7, 3)
    m = merge_matrix(7, cl)
    assert np.allclose(m @ m, m) and np.allclose(m.sum(1), 1)  # C4: idempotent, rows sum to 1
    eta, eps = 1e-4, 3e-3
    d = eta * np.eye(7) + eps * (np.eye(7) - m)
    for c in cl:
        ones = np.zeros(7)
        ones[c] = 1
        assert np.allclose(d @ ones, eta * ones)


def test_deviation_decays_at_the_exact_rate_whatever_the_data():
    """C1: plain SGD, float64: chi_t = chi_0 (1 - lr (eta + eps))^(2t), rel 1e-10."""
    net, x, graph, groups = _setup()
    clusters = cluster(graph, groups, {g.id: g.size // 2 for g in groups}, how="even")
    rule = Centripetal(graph, clusters, eps=0.05, weight_decay=1e-3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    chi0 = deviation(net, graph, clusters)
    steps = 12
    for t in range(steps):
        data = torch.randn(4, 3, 8, 8, dtype=torch.float64) * (t + 1)  # any data
        loss = net(data).pow(2).mean() + net(data)[:, 0].sum()
        opt.zero_grad()
        loss.backward()
        rule.after_backward(net)
        opt.step()
    want = chi0 * (1 - 0.1 * (1e-3 + 0.05)) ** (2 * steps)
    assert abs(deviation(net, graph, clusters) - want) / want < 1e-10


def _make_identical(net, graph, clusters):
    """Force each cluster's members identical on every producing-side tensor (and BN statistics)."""
    with torch.no_grad():
        for gid, cl in clusters.items():
            for m in graph.groups[gid].members:
                if m.param == "weight" and m.dim == 1:
                    continue  # consumers' input slices stay as they are
                t = getattr(net.get_submodule(m.module), m.param).movedim(m.dim, 0)
                for c in cl:
                    t[torch.tensor(c)] = t[int(c[0])].clone()


def test_merging_identical_clusters_is_exact_and_dropping_is_not():
    """C2: sum-merge of identical members changes nothing (1e-12, float64); dropping does."""
    net, x, graph, groups = _setup(1)
    inner = [g for g in groups if g.producers[:1] == ["c1"]]
    clusters = cluster(graph, inner, {g.id: 5 for g in inner}, how="kmeans")
    _make_identical(net, graph, clusters)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics identical too (make_identical set them)
            assert m.running_var.min() > 0
    target, plan = merge_plan(net, graph, clusters)
    pruned = surgery.apply(target, plan)
    assert pruned.c1.out_channels == 5 and pruned.c2.in_channels == 5
    xb = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert float((pruned(xb) - net(xb)).abs().max()) <= 1e-12
        dropped = surgery.apply(net, surgery.Plan.from_dict(
            {**plan.to_dict(), "groups": [{k: v for k, v in g.items() if k != "fold"} for g in plan.to_dict()["groups"]]}))
        assert rel_err(dropped(xb), net(xb)) > 0.05


def test_end_to_end_merge_after_centripetal_training_keeps_the_logits():
    """C3: a residual net (inner group and the residual stream clustered), Nesterov SGD with a large
    eps; after training the merge changes logits by < 1e-4 relative with 100% argmax agreement."""
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(1, 3, 8, 8)
    graph = surgery.trace(net, x)
    groups = [g for g in graph.groups if g.prunable]
    clusters = cluster(graph, groups, {g.id: (g.size * 5) // 8 for g in groups}, how="kmeans")
    rule = Centripetal(graph, clusters, eps=0.5, weight_decay=1e-4)
    names = rule.parameter_names()
    params = dict(net.named_parameters())
    opt = torch.optim.SGD([{"params": [params[n] for n in names], "weight_decay": 0.0},
                           {"params": [p for n, p in params.items() if n not in names], "weight_decay": 1e-4}],
                          lr=0.05, momentum=0.9, nesterov=True)
    data = torch.randn(64, 3, 8, 8)
    labels = torch.randint(0, 5, (64,))
    net.train()
    for step in range(300):
        idx = torch.randint(0, 64, (16,))
        loss = nn.functional.cross_entropy(net(data[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        rule.after_backward(net)
        opt.step()
    net.eval()
    assert deviation(net, graph, clusters) < 1e-8
    target, plan = merge_plan(net, graph, clusters)
    pruned = surgery.apply(target, plan)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in net.parameters())
    with torch.no_grad():
        a, b = net(data), pruned(data)
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())
    assert bool((a.argmax(1) == b.argmax(1)).all())
    masked = surgery.apply(target, plan, mode="mask")
    with torch.no_grad():
        assert rel_err(masked(data), b) < 1e-5  # the 0/1 fold keeps pruned == masked
