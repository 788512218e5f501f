"""ThiNet (METHODS.md section 4): sampled contributions (T1), the Gram greedy against the naive one,
least-squares scales (T3, T5), selection quality (T2), dead channels, scope, and a trained network."""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest
import torch
from torch import nn

import surgery
from surgery.calibration import Calibration, record
from surgery.pipeline import run
from surgery.rewrite import apply_to_graph
from surgery.roles import consumers, producers

from surgery.errors import MethodError, PlanError

methods = importlib.import_module("surgery.methods")  # ``surgery.methods`` is also a function
thinet = importlib.import_module("surgery.methods.thinet")
gram = importlib.import_module("surgery.methods._gram")


# -- nets ------------------------------------------------------------------------------------------
class ConvConv(nn.Module):
    """METHODS 4.7: conv(8 -> 32) + ReLU -> conv(32 -> 16), heterogeneous channel scales."""

    def __init__(self, seed: int = 0, cin: int = 8, mid: int = 32, cout: int = 16, stride: int = 1, dilation: int = 1,
                 kernel: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(cin, mid, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, cout, kernel, stride=stride, padding=dilation * (kernel // 2), dilation=dilation)
        with torch.no_grad():
            for p in (self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            s_out = 10 ** (torch.rand(mid, generator=g) * 2 - 1)  # producer filter scales in [0.1, 10]
            s_in = 10 ** (torch.rand(mid, generator=g) * 2 - 1)  # consumer column scales in [0.1, 10]
            self.conv1.weight.mul_(s_out.view(-1, 1, 1, 1))
            self.conv1.bias.mul_(s_out)
            self.conv2.weight.mul_(s_in.view(1, -1, 1, 1))

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(x)))


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class Tokens(nn.Module):
    """Linear on (batch, tokens, features): the consumer samples token positions."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Conv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, padding=1)
        self.c2 = nn.Conv1d(8, 5, 5, padding=2, stride=2)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


class Padded(nn.Module):
    """The consumer pads by reflection: ThiNet's contributions assume zero padding."""

    def __init__(self, mode: str = "reflect"):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1, padding_mode=mode)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


def _images(n: int, shape=(8, 12, 12), seed: int = 0) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def _group_of(graph, producer: str):
    return next(g for g in graph.groups if g.prunable and [s.owner for s, _ in producers(graph, g)] == [producer])


def _acts(graph, x, nodes) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    record(graph, Calibration(x, batch_size=len(x)), nodes, lambda a, _g, _l: got.update(a))
    return got


def _xy(model, x, producer: str, per_image: int = 10, seed: int = 0):
    graph = surgery.trace(model.eval(), x[:1])
    group = _group_of(graph, producer)
    (site, member), = consumers(graph, group)
    acts = _acts(graph, x, {site.input, site.node})
    X, y = thinet.batch_xy(graph, group, site, member, acts[site.input], acts[site.node], per_image, seed)
    return graph, group, site, X, y


def _one_batch(x):
    return [x]  # an iterable of one tensor: the whole set is a single calibration batch


# -- T1: contributions sum to the consumer's bias-free output --------------------------------------
@pytest.mark.parametrize("model, x, producer", [
    (ConvConv(0), _images(20), "conv1"),
    (ConvConv(1, stride=2, dilation=2), _images(20), "conv1"),
    (ConvConv(2, kernel=1), _images(20), "conv1"),
    (FlattenLinear(), _images(20, (3, 4, 4)), "conv"),
    (Tokens(), _images(20, (7, 6)), "fc1"),
    (Conv1d(), _images(20, (3, 17)), "c1"),
], ids=["conv3x3", "stride2-dilation2", "conv1x1", "flatten-linear", "tokens", "conv1d"])
def test_t1_contributions_sum_to_consumer_output(model, x, producer):
    _, group, _, X, y = _xy(model, x, producer)
    assert X.shape == (len(x) * 10, group.size)
    tol = 1e-5 * (np.abs(y) + np.abs(y).mean())
    assert (np.abs(X.sum(1) - y) <= tol).all()
    assert np.abs(y).mean() > 1e-3  # a real output, not zeros


def test_t1_sampling_covers_channels_and_positions():
    _, _, _, X, _ = _xy(ConvConv(0), _images(200), "conv1")
    assert X.shape == (2000, 32)
    # every column is used: no channel is silently dropped from the statistics
    assert (np.abs(X).sum(0) > 0).all()


def test_streamed_gram_equals_xtx():
    model, x = ConvConv(3).eval(), _images(64)
    graph, group, _, X, _ = _xy(model, x, "conv1", per_image=7, seed=5)
    ctx = methods.ScoreContext(model, graph, [group], Calibration(_one_batch(x)))
    todo, skipped = thinet._eligible(ctx, "inner")
    assert not skipped and list(todo) == [group.id]
    G = thinet.collect_grams(ctx, todo, per_image=7, seed=5)[group.id]
    np.testing.assert_allclose(G, X.T @ X, rtol=1e-6, atol=1e-8 * np.abs(G).max())


# -- the Gram greedy is the naive greedy -------------------------------------------------------------
def naive_backward(X: np.ndarray) -> list[int]:
    T: list[int] = []
    left = list(range(X.shape[1]))
    while left:
        cost = [float(np.sum(X[:, T + [c]].sum(1) ** 2)) for c in left]
        c = left[int(np.argmin(cost))]
        T.append(c)
        left.remove(c)
    return T


def naive_forward(X: np.ndarray) -> list[int]:
    y = X.sum(1)
    S: list[int] = []
    r = y.copy()
    for _ in range(X.shape[1]):
        gain = [(X[:, j] @ r) ** 2 / (X[:, j] @ X[:, j]) if j not in S else -np.inf for j in range(X.shape[1])]
        S.append(int(np.argmax(gain)))
        w = np.linalg.lstsq(X[:, S], y, rcond=None)[0]
        r = y - X[:, S] @ w
    return S


def _random_x(seed: int, m: int, c: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # correlated columns with heterogeneous scales, like real contributions
    return rng.normal(size=(m, c)) @ rng.normal(size=(c, c)) * 0.3 + rng.normal(size=(m, c)) * rng.uniform(0.1, 3, c)


@pytest.mark.parametrize("seed, m, c", [(0, 50, 6), (1, 200, 16), (2, 40, 40), (3, 30, 64), (4, 500, 33)])
def test_gram_greedy_equals_naive_greedy(seed, m, c):
    X = _random_x(seed, m, c)
    order = gram.backward_order(X.T @ X)
    assert order.tolist() == naive_backward(X)
    # scores: removing the k lowest is the greedy's first k removals, for every k
    s = gram.ranks(order)
    for k in range(c):
        assert set(np.argsort(s, kind="stable")[:k].tolist()) == set(order[:k].tolist())


@pytest.mark.parametrize("seed, m, c", [(0, 50, 6), (1, 200, 16), (4, 500, 33)])
def test_forward_selection_equals_naive_omp(seed, m, c):
    X = _random_x(seed, m, c)
    assert gram.forward_order(X.T @ X, ridge=0.0).tolist() == naive_forward(X)
    assert gram.forward_order(X.T @ X).tolist() == naive_forward(X)  # the default ridge changes nothing here


def test_forward_selection_puts_dead_channels_last():
    X = _random_x(7, 100, 10)
    X[:, [2, 5]] = 0
    order = gram.forward_order(X.T @ X)
    assert sorted(order.tolist()) == list(range(10)) and order[-2:].tolist() == [2, 5]


def test_t4_greedy_is_near_exhaustive_optimum():
    import itertools

    for seed in range(3):
        X = _random_x(seed, 120, 10)
        G = X.T @ X
        order = gram.backward_order(G)
        greedy = gram.sampled_error(G, order[5:])
        best = min(gram.sampled_error(G, [c for c in range(10) if c not in T]) for T in itertools.combinations(range(10), 5))
        assert best <= greedy + 1e-9 and greedy <= 1.5 * best + 1e-12


# -- least-squares scales ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_least_squares_equals_lstsq(seed):
    X = _random_x(seed, 400, 30)
    keep = np.sort(np.random.default_rng(seed).choice(30, 12, replace=False))
    w = gram.least_squares(X.T @ X, keep)
    ref = np.linalg.lstsq(X[:, keep], X.sum(1), rcond=None)[0]
    np.testing.assert_allclose(w, ref, rtol=1e-6, atol=1e-9)
    assert gram.sampled_error(X.T @ X, keep, w) == pytest.approx(np.sum((X[:, keep] @ ref - X.sum(1)) ** 2), rel=1e-6)


def test_least_squares_with_singular_gram():
    X = _random_x(0, 100, 8)
    X[:, 3] = 0  # a dead kept channel: G_SS is singular without the ridge
    w = gram.least_squares(X.T @ X, [0, 3, 5], ridge=0.0)
    ref = np.linalg.lstsq(X[:, [0, 3, 5]], X.sum(1), rcond=None)[0]
    assert np.isfinite(w).all()
    np.testing.assert_allclose(X[:, [0, 3, 5]] @ w, X[:, [0, 3, 5]] @ ref, rtol=1e-6, atol=1e-9)


def _fixed_seed_setup(seed: int = 0):
    model = ConvConv(seed).eval()
    x, held = _images(200, seed=seed), _images(100, seed=seed + 1000)
    graph = surgery.trace(model, x[:1])
    group = _group_of(graph, "conv1")
    (site, member), = consumers(graph, group)
    acts = _acts(graph, x, {site.input, site.node})
    X, y = thinet.batch_xy(graph, group, site, member, acts[site.input], acts[site.node], 10, 0)
    return model, x, held, group, X, y


def _keep(plan, gid):
    return np.array(next(g for g in plan.groups if g.id == gid).keep)


def test_t3_t5_least_squares_fold():
    model, x, held, group, X, y = _fixed_seed_setup(0)
    res = run(model, x[:1], "thinet", 0.5, data=_one_batch(x))
    gp = next(g for g in res.plan.groups if g.id == group.id)
    F = gp.fold_matrix()
    keep = np.array(gp.keep)
    assert F is not None and F.shape == (16, 32)
    assert np.count_nonzero(F) == 16 and np.allclose(F[:, keep].diagonal(), F[F != 0])  # diagonal on kept
    G = X.T @ X
    yy = float(y @ y)
    # T3: least squares never increases the sampled error (relative to ||y||^2)
    unscaled, scaled = gram.sampled_error(G, keep) / yy, gram.sampled_error(G, keep, F[:, keep].diagonal()) / yy
    assert scaled <= unscaled + 1e-9 and scaled < unscaled
    # T5: the pruned network's consumer output equals X_S w at the sampled positions
    graph_p = surgery.trace(res.model, x[:1])
    group_p = _group_of(graph_p, "conv1")
    (site_p, member_p), = consumers(graph_p, group_p)
    acts = _acts(graph_p, x, {site_p.input, site_p.node})
    _, y_pruned = thinet.batch_xy(graph_p, group_p, site_p, member_p, acts[site_p.input], acts[site_p.node], 10, 0)
    np.testing.assert_allclose(y_pruned, X @ F.T @ np.ones(16), rtol=1e-5, atol=1e-5 * np.abs(y).mean())
    # and on held-out images the scales help too (METHODS 4.7: 10/10 seeds)
    plain = run(model, x[:1], "thinet", 0.5, data=_one_batch(x), scale=False).model
    with torch.no_grad():
        ref = model(held)
        e_ls = float((res.model(held) - ref).norm() / ref.norm())
        e_plain = float((plain(held) - ref).norm() / ref.norm())
    assert e_ls < e_plain


def t2_figures(seed: int = 0) -> dict[str, float]:
    """Sampled relative reconstruction errors (greedy, L1, best of 20 random) and held-out errors."""
    model, x, held, group, X, y = _fixed_seed_setup(seed)
    G, yy = X.T @ X, float(y @ y)
    plans = {m: run(model, x[:1], m, 0.5, data=_one_batch(x), scale=False, mode=None).plan if m.startswith("thinet")
             else run(model, x[:1], m, 0.5, mode=None).plan for m in ("thinet", "thinet-forward", "l1")}
    out = {f"sampled {m}": gram.sampled_error(G, _keep(p, group.id)) / yy for m, p in plans.items()}
    rng = np.random.default_rng(seed)
    out["sampled random (best of 20)"] = min(
        gram.sampled_error(G, np.sort(rng.choice(32, 16, replace=False))) / yy for _ in range(20))
    graph = surgery.trace(model, x[:1])
    with torch.no_grad():
        ref = model(held)
        for m, p in plans.items():
            out[f"held-out {m}"] = float((apply_to_graph(graph, p)(held) - ref).norm() / ref.norm())
    return out


def test_t2_greedy_beats_l1_and_random_subsets():
    f = t2_figures(0)
    assert f["sampled thinet"] <= f["sampled l1"]
    assert f["sampled thinet"] <= f["sampled random (best of 20)"]
    assert f["held-out thinet"] < f["held-out l1"]
    assert f["sampled thinet-forward"] <= f["sampled l1"]


# -- dead channels, scope, unsupported consumers -----------------------------------------------------
def _dead_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)).eval()
    dead = [1, 4, 7, 10, 13, 15]
    with torch.no_grad():
        net[0].weight[dead] = 0
        net[0].bias[dead] = 0
    return net, dead


@pytest.mark.parametrize("method", ["thinet", "thinet-forward"])
@pytest.mark.parametrize("scale", [True, False])
def test_dead_channels_go_first_and_change_nothing(method, scale):
    net, dead = _dead_net()
    x = _images(64, (3, 10, 10))
    res = run(net, x[:1], method, 6 / 16, data=x, scale=scale)
    (gp,) = res.plan.groups
    assert gp.removed == dead
    with torch.no_grad():
        ref = net(x)
        assert float((res.model(x) - ref).norm() / ref.norm()) < 1e-5


def test_dead_channels_lowest_scores():
    net, dead = _dead_net()
    x = _images(64, (3, 10, 10))
    graph = surgery.trace(net, x[:1])
    ctx = methods.ScoreContext(net, graph, graph.prunable_groups, Calibration(x))
    scores = thinet.thinet(ctx, samples_per_image=10, scale=True, scope="inner", ridge=1e-8, seed=0)
    (s,) = scores.scores.values()
    assert set(np.argsort(s)[:6].tolist()) == set(dead)


def test_scope_inner_skips_residual_streams_all_scores_them():
    from samples.resnet_mini import resnet_mini

    torch.manual_seed(0)
    model, x = resnet_mini().eval(), torch.randn(48, 1, 16, 16)
    graph = surgery.trace(model, x[:1])
    stream = {g.id for g in graph.prunable_groups if len(producers(graph, g)) > 1}
    inner = {g.id for g in graph.prunable_groups if len(producers(graph, g)) == 1}
    assert stream and inner
    p = surgery.plan(model, x[:1], "thinet", 0.5, data=x)
    assert {g.id for g in p.groups} == inner
    assert set(p.notes) == stream and all("residual stream" in v for v in p.notes.values())
    p_all = surgery.plan(model, x[:1], "thinet", 0.5, data=x, scope="all")
    assert {g.id for g in p_all.groups} == inner | stream and not p_all.notes
    assert all(g.fold for g in p_all.groups)


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_non_zero_padding_consumer_is_skipped(mode):
    net, x = Padded(mode).eval(), _images(8, (3, 8, 8))
    p = surgery.plan(net, x[:1], "thinet", 0.5, data=x)
    assert not p.groups and list(p.notes.values()) == ["consumer c2 pads with something other than explicit zeros"]


def test_no_consumer_is_skipped():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Softmax(1))
    x = _images(4, (3, 8, 8))
    graph = surgery.trace(net.eval(), x[:1])
    ctx = methods.ScoreContext(net, graph, [g for g in graph.groups if g.size == 8], Calibration(x))
    out = thinet.thinet(ctx, samples_per_image=10, scale=True, scope="inner", ridge=1e-8, seed=0)
    assert not out.scores and all("no conv or linear consumes" in r for r in out.skipped.values())


def test_options_are_declared_and_checked():
    m = methods.get_method("thinet")
    assert m.needs_data and m.resolve({}) == {"samples_per_image": 10, "scale": True, "scope": "inner", "ridge": 1e-8, "seed": 0}
    assert m.resolve({"scope": "all", "scale": "false", "samples_per_image": "3"})["scale"] is False
    with pytest.raises(MethodError):
        m.resolve({"scope": "outer"})
    with pytest.raises(PlanError, match="needs calibration data"):
        surgery.plan(ConvConv(0), _images(1), "thinet", 0.5)


def test_same_seed_same_plan_other_seed_other_samples():
    model, x = ConvConv(4).eval(), _images(40)
    a = surgery.plan(model, x[:1], "thinet", 0.5, data=x, samples_per_image=2)
    b = surgery.plan(model, x[:1], "thinet", 0.5, data=x, samples_per_image=2)
    c = surgery.plan(model, x[:1], "thinet", 0.5, data=x, samples_per_image=2, seed=1)
    assert a.groups == b.groups and a.groups[0].fold != c.groups[0].fold


def test_export_front_end():
    """torch.export front end (fx cannot trace the shape branch): aten conv / linear consumers,
    a consumer reading a permuted concatenation of two groups."""
    from test_export_frontend import ShapeBranch

    torch.manual_seed(0)
    model, x = ShapeBranch().eval(), torch.randn(32, 3, 8, 8)
    # the exported graph is specialised to the example's batch size: calibrate in batches of that size
    res = run(model, x[:2], "thinet", 0.5, data=list(x.split(2)), scope="all", skip_cross_channel=True)
    assert res.graph.frontend == "export" and res.plan.groups and all(g.fold for g in res.plan.groups)
    masked = apply_to_graph(res.graph, res.plan, "mask")
    with torch.no_grad():
        a, b = torch.cat([res.model(c) for c in x.split(2)]), torch.cat([masked(c) for c in x.split(2)])
    assert float((a - b).norm() / b.norm()) < 1e-5


# -- a trained network: digits ---------------------------------------------------------------------------
def digits_reconstruction(epochs: int = 2, n_cal: int = 256) -> dict[str, dict[int, float]]:
    """Train ``resnet_mini`` on digits as samples/demo.py does; for each group ThiNet prunes at ratio
    0.5, the relative error of its consumer's output on held-out images when only that group is
    pruned (thinet / l1 / random), before any fine-tuning."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from samples.demo import digits, train
    from samples.resnet_mini import resnet_mini

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a busy 2-core machine run this 5x slower, not faster
    try:
        return _digits_reconstruction(digits, train, resnet_mini, epochs, n_cal)
    finally:
        torch.set_num_threads(threads)


def _digits_reconstruction(digits, train, resnet_mini, epochs: int, n_cal: int) -> dict[str, dict[int, float]]:
    torch.manual_seed(0)
    (xtr, ytr), (xte, _) = digits()
    model = resnet_mini()
    train(model, (xtr, ytr), epochs, lr=0.05)
    model.eval()
    cal = xtr[torch.randperm(len(xtr), generator=torch.Generator().manual_seed(1))[:n_cal]]
    out: dict[str, dict[int, float]] = {}
    for method in ("thinet", "thinet-forward", "l1", "random"):
        res = run(model, xtr[:1], method, 0.5, data=cal if method.startswith("thinet") else None, mode=None)
        if method == "thinet":
            todo = {g.id: g for g in res.plan.groups}
        errs = {}
        for gid, gp in ((g.id, g) for g in res.plan.groups if g.id in todo):
            (site, _), = consumers(res.graph, res.graph.groups[gid])
            single = apply_to_graph(res.graph, dataclasses.replace(res.plan, groups=(gp,)))
            got = {}
            hooks = [m.get_submodule(site.owner).register_forward_hook(lambda _m, _i, o, k=k: got.__setitem__(k, o))
                     for k, m in (("ref", model), ("new", single))]
            with torch.no_grad():
                model(xte), single(xte)
            for h in hooks:
                h.remove()
            errs[gid] = float((got["new"] - got["ref"]).norm() / got["ref"].norm())
        out[method] = errs
    return out


def test_digits_thinet_reconstructs_consumers_better_than_l1_and_random():
    figs = digits_reconstruction()
    mean = {m: float(np.mean(list(e.values()))) for m, e in figs.items()}
    assert len(figs["thinet"]) == 6 and set(figs["l1"]) == set(figs["thinet"]) == set(figs["random"])
    assert mean["thinet"] < mean["l1"] and mean["thinet"] < mean["random"]
    assert mean["thinet-forward"] < mean["l1"] and mean["thinet-forward"] < mean["random"]
    # group by group too: ThiNet wins on most groups
    assert sum(figs["thinet"][g] < min(figs["l1"][g], figs["random"][g]) for g in figs["thinet"]) >= 4
