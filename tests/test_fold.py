"""The fold law: a plan's fold ``F`` (kept x size) rewrites every consumer's input slices of the group
as ``W_in @ F^T``; mask mode applies the same ``F`` at full width, so pruned == masked still holds.
Then ThiNet's least-squares fold end to end."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from surgery.pipeline import run
from surgery.plan import GroupPlan
from surgery.rewrite import apply_to_graph
from surgery.roles import consumers, producers


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _with_folds(plan, gids, seed: int = 0):
    """``plan`` with a dense random fold (off-diagonal entries: removed channels summed into kept
    ones, kept channels mixed) on the groups ``gids``."""
    rng = np.random.default_rng(seed)
    groups = []
    for gp in plan.groups:
        if gp.id in gids:
            F = rng.normal(size=(len(gp.keep), gp.size)) * 0.5
            F[np.arange(len(gp.keep)), list(gp.keep)] += 1.0
            gp = dataclasses.replace(gp, fold=GroupPlan.sparse(F))
        groups.append(gp)
    assert {g.id for g in groups if g.fold} == set(gids)
    return dataclasses.replace(plan, groups=tuple(groups))


def _pruned_and_masked(model, x, gids_of, method: str = "random", **options):
    res = run(model.eval(), x[:1], method, 0.5, mode=None, **options)
    plan = _with_folds(res.plan, gids_of(res.graph, res.plan))
    pruned, masked = apply_to_graph(res.graph, plan), apply_to_graph(res.graph, plan, "mask")
    with torch.no_grad():
        return res.graph, plan, pruned(x), masked(x), model(x)


def _stream_and_inner(graph, plan):
    planned = {g.id for g in plan.groups}
    stream = [g.id for g in graph.prunable_groups if len(producers(graph, g)) > 1 and g.id in planned]
    inner = [g.id for g in graph.prunable_groups if len(producers(graph, g)) == 1 and g.id in planned]
    assert stream and inner
    return {stream[0], inner[0]}


# -- (a) residual nets -------------------------------------------------------------------------------
def test_fold_on_residual_stream_and_inner_group_resnet_mini():
    from samples.resnet_mini import resnet_mini

    torch.manual_seed(0)
    _, _, p, m, y = _pruned_and_masked(resnet_mini(), torch.randn(8, 1, 16, 16), _stream_and_inner)
    assert _rel(p, m) < 1e-5 and _rel(p, y) > 1e-3  # the fold changed the function, identically in both


def test_fold_on_residual_stream_and_inner_group_resnet18():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10)
    _, _, p, m, y = _pruned_and_masked(model, torch.randn(4, 3, 32, 32), _stream_and_inner)
    assert _rel(p, m) < 1e-5 and _rel(p, y) > 1e-3


# -- (b) conv -> flatten -> linear ---------------------------------------------------------------------
class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_fold_into_flatten_linear():
    torch.manual_seed(0)
    model = FlattenLinear()
    graph, plan, p, m, _ = _pruned_and_masked(model, torch.randn(8, 3, 4, 4), lambda g, pl: {x.id for x in pl.groups})
    assert _rel(p, m) < 1e-5
    (gp,) = plan.groups
    F = torch.from_numpy(gp.fold_matrix())
    W = model.fc.weight.detach().double().reshape(5, 6, 16)
    want = torch.einsum("kc,ocp->okp", F, W).reshape(5, -1).float()
    got = apply_to_graph(graph, plan).fc.weight
    assert got.shape == (5, len(gp.keep) * 16)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# -- (c) hand computation on conv -> conv ----------------------------------------------------------------
class ConvConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_fold_equals_hand_computation_conv_conv():
    torch.manual_seed(0)
    model, x = ConvConv().eval(), torch.randn(4, 3, 6, 6)
    graph, plan, p, m, _ = _pruned_and_masked(model, x, lambda g, pl: {x.id for x in pl.groups})
    (gp,) = plan.groups
    F = torch.from_numpy(gp.fold_matrix())
    W = model.b.weight.detach().double()
    keep = list(gp.keep)
    pruned = apply_to_graph(graph, plan)
    torch.testing.assert_close(pruned.b.weight, torch.einsum("kc,oc...->ok...", F, W).float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pruned.a.weight, model.a.weight[keep])  # the producer is only sliced
    masked_w = apply_to_graph(graph, plan, "mask").b.weight
    full = torch.zeros_like(W)
    full[:, keep] = torch.einsum("kc,oc...->ok...", F, W)
    torch.testing.assert_close(masked_w, full.float(), rtol=1e-6, atol=1e-6)  # F at full width, removed zeroed
    assert _rel(p, m) < 1e-5
    # by hand: consumer input = relu(a(x)) restricted to kept, through the folded weight
    with torch.no_grad():
        h = torch.relu(model.a(x))[:, keep]
        ref = nn.functional.conv2d(h, torch.einsum("kc,oc...->ok...", F, W).float(), model.b.bias, padding=1)
    assert _rel(p, ref) < 1e-5


class Shared(nn.Module):
    """One consumer module called twice: its weight must be folded once."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(y))) + self.c(y)


def test_shared_consumer_is_folded_once():
    torch.manual_seed(0)
    model, x = Shared().eval(), torch.randn(4, 3, 6, 6)
    graph, plan, p, m, _ = _pruned_and_masked(model, x, lambda g, pl: {x.id for x in pl.groups})
    (gp,) = [g for g in plan.groups if any(s.owner == "c" for s, _ in consumers(graph, graph.groups[g.id]))]
    assert [s.owner for s, _ in consumers(graph, graph.groups[gp.id])].count("c") == 2
    F = torch.from_numpy(gp.fold_matrix())
    got = apply_to_graph(graph, plan).c.weight
    torch.testing.assert_close(got, torch.einsum("kc,oc...->ok...", F, model.c.weight.detach().double()).float(),
                               rtol=1e-6, atol=1e-6)
    assert _rel(p, m) < 1e-5


# -- ThiNet end to end -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["thinet", "thinet-forward"])
@pytest.mark.parametrize("scope", ["inner", "all"])
def test_thinet_pruned_equals_masked(method, scope):
    from samples.resnet_mini import resnet_mini

    torch.manual_seed(0)
    model, x = resnet_mini().eval(), torch.randn(64, 1, 16, 16)
    res = run(model, x[:1], method, 0.5, data=x, scope=scope)
    assert res.plan.groups and all(g.fold for g in res.plan.groups)
    masked = apply_to_graph(res.graph, res.plan, "mask")
    with torch.no_grad():
        assert _rel(res.model(x), masked(x)) < 1e-5


def test_thinet_pruned_equals_masked_resnet18():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model, x = tv.models.resnet18(num_classes=10).eval(), torch.randn(16, 3, 32, 32)
    res = run(model, x[:1], "thinet", 0.3, data=x)
    assert len(res.plan.groups) == 8 and all(g.fold for g in res.plan.groups)  # the blocks' inner groups
    masked = apply_to_graph(res.graph, res.plan, "mask")
    with torch.no_grad():
        assert _rel(res.model(x), masked(x)) < 1e-5


class Redundant(nn.Module):
    """Half of conv1's channels are exact positive multiples of the other half (relu is positively
    homogeneous) and conv2 reads them through proportional, small columns: their contributions are
    multiples of their twins', so removing them and rescaling the twins is exact."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(4, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 6, 3, padding=1)
        with torch.no_grad():
            for p in (self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            a = 0.5 + torch.rand(8, generator=g)  # activation multiples
            mu = 0.02 * (1 + torch.rand(8, generator=g))  # small consumer multiples
            self.conv1.weight[8:] = self.conv1.weight[:8] * a.view(-1, 1, 1, 1)
            self.conv1.bias[8:] = self.conv1.bias[:8] * a
            self.conv2.weight[:, 8:] = self.conv2.weight[:, :8] * mu.view(1, -1, 1, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


@pytest.mark.parametrize("method", ["thinet", "thinet-forward"])
def test_thinet_exact_when_an_exact_solution_exists(method):
    model, x = Redundant().eval(), torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    held = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    res = run(model, x[:1], method, 0.5, data=x)
    (gp,) = res.plan.groups
    if method == "thinet":  # the small twins contribute least: the greedy removes them
        assert gp.removed == list(range(8, 16))
    else:  # a twin and its original are equally good picks: one of each pair is kept
        assert sorted(c % 8 for c in gp.keep) == list(range(8))
    plain = run(model, x[:1], method, 0.5, data=x, scale=False).model
    with torch.no_grad():
        ref = model(held)
        assert _rel(res.model(held), ref) < 1e-4
        assert _rel(plain(held), ref) > 1e-2  # without the fold the same selection is not exact
