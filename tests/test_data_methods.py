"""Data-driven methods: apoz, entropy, taylor, obd.

Dead-channel oracles (exactly the dead channels go and the outputs do not move), the properties of
METHODS.md 5.3-5.5 and OBD's definition recomputed by hand, and the planner's errors for missing data
or labels.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from surgery.calibration import Calibration
from surgery.errors import PlanError
from surgery.methods import ScoreContext, get_method
from surgery.methods._activations import NO_CONSUMER, observations
from surgery.methods.apoz import zero_fraction
from surgery.methods.entropy import binned_entropy
from surgery.methods.taylor import taylor_raw
from surgery.pipeline import run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import assert_same_state, check_pruned_equals_masked, rel_err, state_snapshot  # noqa: E402

DATA_METHODS = ("apoz", "entropy", "taylor", "obd")


# -- models ---------------------------------------------------------------------------------------
def _kill(bn: nn.BatchNorm2d, channels) -> None:
    """gamma = 0, beta < 0: the BN output is -1 and the ReLU after it is exactly 0 on every input."""
    with torch.no_grad():
        bn.weight[list(channels)] = 0.0
        bn.bias[list(channels)] = -1.0


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


class Plain(nn.Module):
    """conv-BN-ReLU-conv: one prunable group (the 8 hidden channels)."""

    def __init__(self, dead=(1, 4)):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        _randomize_bn(self, gen)
        _kill(self.bn1, dead)

    def forward(self, x):
        return self.conv2(F.relu(self.bn1(self.conv1(x))))


class Residual(nn.Module):
    """stem -> one basic block (x + block(x)) -> head: the residual stream (8) and the block's inner
    channels (8) are the prunable groups; the stream is read by the block's conv1 and by the head."""

    def __init__(self, dead_stream=(0, 5), dead_inner=(2, 6)):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)
        _randomize_bn(self, gen)
        _kill(self.bn0, dead_stream)
        _kill(self.bn2, dead_stream)  # 0 + (-1) -> ReLU 0 after the add
        _kill(self.bn1, dead_inner)

    def forward(self, x):
        s = F.relu(self.bn0(self.stem(x)))
        out = F.relu(s + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(s))))))
        return self.head(out)


def _data(n=24, shape=(3, 6, 6), classes=4, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def _ctx(model: nn.Module, data, batch_size=8, loss=None) -> ScoreContext:
    x = data[0] if isinstance(data, tuple) else data
    graph = surgery.trace(model.eval(), x[:1])
    groups = [g for g in graph.groups if g.prunable]
    return ScoreContext(model, graph, groups, Calibration(data, batch_size=batch_size), loss)


def _group_of(ctx: ScoreContext, module: str):
    """The prunable group that ``module``'s output channels belong to."""
    for g in ctx.groups:
        if any(m.module == module and m.param == "weight" and m.dim == 0 for m in g.members):
            return g
    raise AssertionError(f"no group produced by {module}")


def _removed(plan) -> dict[int, list[int]]:
    return {g.id: sorted(set(range(g.size)) - set(g.keep)) for g in plan.groups}


# -- dead channels: exactly they go, outputs unchanged -------------------------------------------------
@pytest.mark.parametrize("method", DATA_METHODS)
def test_dead_channels_removed_plain(method):
    model = Plain(dead=(1, 4)).eval()
    x, y = _data()
    before = state_snapshot(model)
    result = run(model, x[:1], method, 2 / 8, data=(x, y))
    assert _removed(result.plan) == {1: [1, 4]}
    with torch.no_grad():
        assert rel_err(result.model(x), model(x)) < 1e-5
    assert result.model.conv1.out_channels == 6
    assert_same_state(model, before)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", DATA_METHODS)
def test_dead_channels_removed_residual(method):
    model = Residual(dead_stream=(0, 5), dead_inner=(2, 6)).eval()
    x, y = _data()
    result = run(model, x[:1], method, 2 / 8, data=(x, y))
    ctx = _ctx(model, (x, y))
    stream, inner = _group_of(ctx, "stem"), _group_of(ctx, "conv1")
    assert _removed(result.plan) == {stream.id: [0, 5], inner.id: [2, 6]}
    with torch.no_grad():
        assert rel_err(result.model(x), model(x)) < 1e-5
    assert result.model.stem.out_channels == 6 and result.model.conv1.out_channels == 6
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", DATA_METHODS)
def test_dead_channels_score_lowest_value(method):
    """APoZ = 1 (score 0), constant => H = 0, zero activation => Taylor 0, zero-gradient/zero-weight => OBD 0."""
    model = Residual().eval()
    ctx = _ctx(model, _data())
    scores = get_method(method).fn(ctx, **get_method(method).resolve()).scores
    stream, inner = _group_of(ctx, "stem"), _group_of(ctx, "conv1")
    for g, dead in ((stream, [0, 5]), (inner, [2, 6])):
        s = scores[g.id]
        live = [c for c in range(g.size) if c not in dead]
        assert np.all(s[dead] == 0.0), (method, s)
        assert np.all(s[live] > 0.0), (method, s)


def test_global_policy_removes_the_dead_channels_of_every_group():
    model = Residual().eval()
    x, y = _data()
    for method in DATA_METHODS:
        plan = surgery.plan(model, x[:1], method=method, ratio=4 / 16, data=(x, y), policy="global")
        assert sorted(sum(_removed(plan).values(), [])) == [0, 2, 5, 6], method


def test_entropy_selects_a_constant_positive_channel():
    """Filter zero and bias positive: the channel is a positive constant, H = 0 (selection only: removing
    it changes the outputs unless the constant is folded into the next bias)."""
    model = Plain(dead=()).eval()
    with torch.no_grad():
        model.conv1.weight[3] = 0.0
        model.conv1.bias[3] = 2.0
        model.bn1.bias[3] = 0.5  # BN keeps it positive: relu(const) > 0
    x, _ = _data()
    ctx = _ctx(model, x)
    scores = get_method("entropy").fn(ctx, bins=10).scores[ctx.groups[0].id]
    assert scores[3] == 0.0 and np.all(np.delete(scores, 3) > 0)
    plan = surgery.plan(model, x[:1], method="entropy", ratio=1 / 8, data=x)
    assert _removed(plan) == {ctx.groups[0].id: [3]}


# -- APoZ --------------------------------------------------------------------------------------------
def _relu_outputs(model: Plain, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.relu(model.bn1(model.conv1(x)))


def test_apoz_is_the_fraction_of_zeros_in_multiples_of_one_over_nm():
    model = Plain(dead=(1,)).eval()
    with torch.no_grad():
        model.bn1.bias.copy_(torch.linspace(-1.0, 1.0, 8))  # a range of zero fractions
        model.bn1.weight[1], model.bn1.bias[1] = 0.0, -1.0
    x, _ = _data(n=10)
    ctx = _ctx(model, x, batch_size=3)  # 4 batches, the last one short
    apoz, _ = zero_fraction(ctx)
    a = apoz[ctx.groups[0].id]
    n, m = 10, 6 * 6
    counts = a * n * m
    assert np.allclose(counts, np.round(counts), atol=1e-9)
    expected = (_relu_outputs(model, x) == 0).double().mean((0, 2, 3)).numpy()
    assert np.allclose(a, expected, atol=1e-12)
    assert a[1] == 1.0 and len(np.unique(np.round(counts))) > 3  # not only 0 and 1
    scores = get_method("apoz").fn(ctx, zero_tol=0.0).scores[ctx.groups[0].id]
    assert np.allclose(scores, 1.0 - a)


def test_apoz_zero_tol_counts_small_values_as_zero():
    model = Plain(dead=()).eval()
    x, _ = _data(n=6)
    ctx = _ctx(model, x)
    acts = _relu_outputs(model, x)
    tol = float(acts.median())
    a = zero_fraction(ctx, zero_tol=tol)[0][ctx.groups[0].id]
    assert np.allclose(a, (acts.abs() <= tol).double().mean((0, 2, 3)).numpy(), atol=1e-12)
    huge = zero_fraction(ctx, zero_tol=float(acts.max()) + 1)[0][ctx.groups[0].id]
    assert np.all(huge == 1.0)
    with pytest.raises(PlanError, match="zero_tol"):
        surgery.plan(model, x[:1], method="apoz", data=x, zero_tol=-1.0)


class FlatHead(nn.Module):
    """conv -> ReLU -> flatten -> linear: the linear reads each of the 4 channels over 3x3 entries."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


def test_apoz_through_flatten_linear_counts_every_entry_of_the_channel():
    torch.manual_seed(0)
    model = FlatHead().eval()
    with torch.no_grad():
        model.conv.bias.copy_(torch.tensor([-3.0, -0.5, 0.0, 0.5]))
    x, _ = _data(n=7, shape=(3, 5, 5))
    ctx = _ctx(model, x)
    g = ctx.groups[0]
    (obs,) = observations(ctx.graph, g)
    assert obs.units.tolist() == np.repeat(np.arange(4), 9).tolist()
    a = zero_fraction(ctx)[0][g.id]
    with torch.no_grad():
        expected = (F.relu(model.conv(x)) == 0).double().mean((0, 2, 3)).numpy()
    assert np.allclose(a, expected, atol=1e-12)
    assert np.allclose(a * 7 * 9, np.round(a * 7 * 9), atol=1e-9)


# -- entropy -----------------------------------------------------------------------------------------
def test_binned_entropy_properties():
    m = 7
    uniform = np.arange(m, dtype=np.float64)[:, None] / m  # one value in each of the m bins
    assert binned_entropy(uniform, m)[0] == pytest.approx(math.log(m), abs=1e-12)
    assert binned_entropy(np.repeat(uniform, 5, axis=0), m)[0] == pytest.approx(math.log(m), abs=1e-12)
    assert binned_entropy(np.full((9, 1), 3.25), m)[0] == 0.0
    two = np.array([[0.0], [0.0], [0.0], [1.0]])  # p = (3/4, 1/4)
    assert binned_entropy(two, 4)[0] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), abs=1e-12)
    v = np.random.default_rng(0).normal(size=(50, 3))
    for scale in (2.0, 3.7, 1e-3):
        assert np.allclose(binned_entropy(v * scale + 0.0, 10), binned_entropy(v, 10), atol=1e-12)
    assert np.all(binned_entropy(v, 10) <= math.log(10) + 1e-12)


class Identity1x1(nn.Module):
    """x -> 1x1 conv (identity) -> ReLU -> 1x1 conv: the group's response is the input itself."""

    def __init__(self, c=3):
        super().__init__()
        self.a = nn.Conv2d(c, c, 1)
        self.b = nn.Conv2d(c, 2, 1)
        with torch.no_grad():
            self.a.weight.copy_(torch.eye(c).view(c, c, 1, 1))
            self.a.bias.zero_()

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


def test_entropy_of_pooled_responses_through_a_model():
    m = 5
    j = torch.arange(m, dtype=torch.float64).repeat(4)  # 20 images, 4 in each of the m bins
    x = torch.zeros(len(j), 3, 4, 4, dtype=torch.float64)
    x[:, 0] = (j / m).view(-1, 1, 1)  # uniform over the bins: log m
    x[:, 1] = 2.0  # constant: 0
    x[:, 2] = torch.where(j < 1, 1.0, 0.0).view(-1, 1, 1)  # 4 images at 1, 16 at 0
    model = Identity1x1().double().eval()
    ctx = _ctx(model, x, batch_size=6)
    h = get_method("entropy").fn(ctx, bins=m).scores[ctx.groups[0].id]
    p = np.array([0.2, 0.8])
    assert np.allclose(h, [math.log(m), 0.0, -(p * np.log(p)).sum()], atol=1e-12)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.a.weight[0] *= 3.7  # positive scaling of channel 0
        scaled.a.weight[2] *= 0.01
    h2 = get_method("entropy").fn(_ctx(scaled, x, batch_size=6), bins=m).scores[ctx.groups[0].id]
    assert np.allclose(h2, h, atol=1e-12)


def test_entropy_bins_option_is_checked():
    x, _ = _data(n=4)
    with pytest.raises(PlanError, match="bins"):
        surgery.plan(Plain(), x[:1], method="entropy", data=x, bins=1)
    with pytest.raises(PlanError, match="bins"):
        surgery.plan(Plain(), x[:1], method="entropy", data=x, bins=2.5)


# -- Taylor ------------------------------------------------------------------------------------------
class LinearHead(nn.Module):
    """conv(3->6) -> ReLU -> 1x1 conv(6->4) -> GAP -> linear(4->3): everything after the ReLU is linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3)
        self.conv2 = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        z = self.conv2(F.relu(self.conv1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


def _one_class_loss(k):
    return lambda outputs, labels: outputs[:, k].sum()


def _exact_delta(model, x, k, zero_columns) -> torch.Tensor:
    """Per-example change of logit k when a consumer's input columns are zeroed (= the channel zeroed)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        zero_columns(m)
        return (m(x) - model(x))[:, k]


def test_taylor_equals_the_exact_loss_change_for_a_loss_linear_in_the_activations():
    torch.manual_seed(0)
    model = LinearHead().double().eval()
    x = torch.randn(9, 3, 6, 6, dtype=torch.float64)
    k = 1
    ctx = _ctx(model, x, batch_size=4, loss=_one_class_loss(k))
    raw, skipped = taylor_raw(ctx)
    assert not skipped
    g1, g2 = _group_of(ctx, "conv1"), _group_of(ctx, "conv2")
    m1 = 4 * 4  # conv2 reads conv1's channels over 4x4 positions
    for c in range(6):
        delta = _exact_delta(model, x, k, lambda m: m.conv2.weight[:, c].zero_())
        assert m1 * raw[g1.id][c] == pytest.approx(float(delta.abs().mean()), rel=1e-10, abs=1e-14)
    for c in range(4):  # fc reads the pooled channels: one position each
        delta = _exact_delta(model, x, k, lambda m: m.fc.weight[:, c].zero_())
        assert raw[g2.id][c] == pytest.approx(float(delta.abs().mean()), rel=1e-10, abs=1e-14)


def test_taylor_flatten_linear_positions_are_the_flattened_entries():
    torch.manual_seed(1)
    model = FlatHead().double().eval()
    x = torch.randn(5, 3, 5, 5, dtype=torch.float64)
    k = 2
    ctx = _ctx(model, x, batch_size=2, loss=_one_class_loss(k))
    theta = taylor_raw(ctx)[0][ctx.groups[0].id]
    for c in range(4):
        delta = _exact_delta(model, x, k, lambda m: m.fc.weight[:, c * 9:(c + 1) * 9].zero_())
        assert 9 * theta[c] == pytest.approx(float(delta.abs().mean()), rel=1e-10, abs=1e-14)


def test_taylor_scores_have_unit_l2_per_group():
    model = Residual().eval()
    ctx = _ctx(model, _data())
    scores = get_method("taylor").fn(ctx).scores
    assert len(scores) == 2
    for s in scores.values():
        assert np.linalg.norm(s) == pytest.approx(1.0, abs=1e-12)
    raw = taylor_raw(ctx)[0]
    for gid, s in scores.items():
        assert np.allclose(s, raw[gid] / np.linalg.norm(raw[gid]), atol=1e-12)


def test_taylor_default_loss_is_summed_cross_entropy():
    """Without loss=..., each example's gradient is its own: batching does not change Theta."""
    model = Plain().double().eval()
    x, y = _data(n=12, dtype=torch.float64)
    a = taylor_raw(_ctx(model, (x, y), batch_size=12))[0]
    b = taylor_raw(_ctx(model, (x, y), batch_size=5))[0]
    for gid in a:
        assert np.allclose(a[gid], b[gid], rtol=1e-10, atol=1e-15)


# -- OBD ---------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 3)

    def forward(self, x):
        return self.conv2(F.relu(self.bn(self.conv1(x))))


def _reference_obd(model: Tiny, batches) -> np.ndarray:
    """0.5 * E[g^2] * w^2 summed over conv1 filter + bias, BN weight + bias, conv2 input columns."""
    ref = copy.deepcopy(model).eval()
    params = dict(ref.named_parameters())
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    for xb, yb in batches:
        out = ref(xb).flatten(2).mean(-1)
        grads = torch.autograd.grad(F.cross_entropy(out, yb), list(params.values()))
        for k, g in zip(params, grads):
            fisher[k] += g.square() / len(batches)
    s = {k: 0.5 * fisher[k] * params[k].detach().square() for k in params}
    total = s["conv1.weight"].sum((1, 2, 3)) + s["conv1.bias"] + s["bn.weight"] + s["bn.bias"]
    total = total + s["conv2.weight"].sum((0, 2, 3))
    return total.numpy()


def _ce64(outputs, labels):
    return F.cross_entropy(outputs.flatten(2).mean(-1), labels)  # the default loss, without its float32 cast


def test_obd_matches_a_direct_computation():
    torch.manual_seed(0)
    model = Tiny().double().eval()
    _randomize_bn(model, torch.Generator().manual_seed(2))
    x, y = _data(n=10, shape=(2, 6, 6), classes=3, dtype=torch.float64)
    ctx = _ctx(model, (x, y), batch_size=4, loss=_ce64)
    s = get_method("obd").fn(ctx, per_sample=False).scores[ctx.groups[0].id]
    batches = list(zip(x.split(4), y.split(4)))
    expected = _reference_obd(model, batches)
    assert np.allclose(s, expected, rtol=1e-10, atol=0)
    per = get_method("obd").fn(ctx, per_sample=True).scores[ctx.groups[0].id]
    singles = [(x[i:i + 1], y[i:i + 1]) for i in range(10)]
    assert np.allclose(per, _reference_obd(model, singles), rtol=1e-10, atol=0)
    # the default loss is the same cross-entropy, computed in float32
    default = get_method("obd").fn(_ctx(model, (x, y), batch_size=4), per_sample=False).scores[ctx.groups[0].id]
    assert np.allclose(default, expected, rtol=1e-4, atol=0)
    assert all(p.grad is None for p in model.parameters())


def test_obd_zero_weights_score_zero():
    model = Tiny().double().eval()
    with torch.no_grad():
        model.conv1.weight[2] = 0.0
        model.conv1.bias[2] = 0.0
        model.bn.weight[2] = 0.0
        model.bn.bias[2] = 0.0
        model.conv2.weight[:, 2] = 0.0
    x, y = _data(n=6, shape=(2, 6, 6), classes=3, dtype=torch.float64)
    s = get_method("obd").fn(_ctx(model, (x, y)), per_sample=False).scores
    (scores,) = s.values()
    assert scores[2] == 0.0 and np.all(np.delete(scores, 2) > 0)


# -- errors and the pipeline ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", DATA_METHODS)
def test_no_data_is_a_plan_error_naming_the_method(method):
    x, _ = _data(n=2)
    with pytest.raises(PlanError, match=f"method '{method}' needs calibration data"):
        surgery.prune(Plain(), x[:1], method=method, ratio=0.5)


@pytest.mark.parametrize("method", ["taylor", "obd"])
def test_labels_or_loss_are_required(method):
    model = Plain().eval()
    x, _ = _data(n=8)
    with pytest.raises(PlanError, match=f"method '{method}' needs labels"):
        surgery.plan(model, x[:1], method=method, ratio=0.5, data=x)
    plan = surgery.plan(model, x[:1], method=method, ratio=2 / 8, data=x, loss=lambda out, _: out.square().sum())
    assert _removed(plan) == {plan.groups[0].id: [1, 4]}


@pytest.mark.parametrize("method", ["apoz", "entropy"])
def test_label_free_methods_take_unlabelled_data(method):
    x, _ = _data(n=8)
    plan = surgery.plan(Plain(), x[:1], method=method, ratio=2 / 8, data=x)
    assert _removed(plan) == {plan.groups[0].id: [1, 4]}


@pytest.mark.parametrize("method", DATA_METHODS)
def test_pruned_equals_masked(method):
    x, y = _data(n=16)
    for model in (Residual(dead_stream=(), dead_inner=()), Plain(dead=())):
        plan, _, _ = check_pruned_equals_masked(model, x[:2], method, 0.5, tol=1e-5, data=(x, y))
        assert plan.groups and all(len(g.keep) == g.size - g.size // 2 for g in plan.groups)
        assert plan.method == method


@pytest.mark.parametrize("method", ["apoz", "entropy", "taylor"])
def test_group_without_a_conv_or_linear_reader_is_left_whole_with_a_reason(method):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.ConvTranspose2d(8, 4, 3)).eval()
    x, y = _data(n=4, shape=(3, 6, 6))
    plan = surgery.plan(model, x[:1], method=method, ratio=0.5, data=(x, y))
    assert not plan.groups
    assert list(plan.notes.values()) == [NO_CONSUMER]
    obd_plan = surgery.plan(model, x[:1], method="obd", ratio=0.5, data=(x, y))  # weights only: scored
    assert len(obd_plan.groups) == 1
