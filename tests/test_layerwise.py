"""Layer-by-layer pruning (ThiNet's schedule, any method): each group gets what a one-shot local plan
gives it, the steps follow the network, data-driven methods score each group on the model the
previous steps pruned and fine-tuned, and the command line runs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import surgery
from helpers import assert_same_state, state_snapshot
from surgery.calibration.data import digits
from surgery.cli import app
from surgery.errors import PlanError
from surgery.methods._registry import _METHODS, register_method
from surgery.train import TrainConfig
from surgery.train.recipes import layer_steps, prune_layerwise


class Chain(nn.Module):
    """Three conv-BN-ReLU stages, a residual add in the middle (a group with two producers)."""

    def __init__(self):
        super().__init__()
        self.c4, self.b4 = nn.Conv2d(12, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)  # registered first, runs last
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.c3, self.b3 = nn.Conv2d(12, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(x)))
        y = torch.relu(self.b3(self.c3(y)) + y)
        y = torch.relu(self.b4(self.c4(y)))
        return self.fc(y.mean((2, 3)))


def _net():
    torch.manual_seed(0)
    net = Chain().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_var.uniform_(0.5, 1.5)
    return net


X = torch.randn(1, 1, 8, 8)
DATA = digits((1, 1, 8, 8))
SMALL = (DATA[0][:400], DATA[1][:400])
CFG = TrainConfig(lr=0.05, batch_size=64, progress=False)


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_steps_follow_the_network_and_each_names_one_group():
    steps = layer_steps(_net(), X)
    assert [p for p, _ in steps] == ["c1", "c2", "c4"]
    assert [label.split(" ")[0] for _, label in steps] == ["c1", "c2", "c4"]


@pytest.mark.parametrize("method,ratio", [("l1", 0.5), ("thinet", 0.4)])
def test_widths_equal_a_one_shot_local_plan(method, ratio):
    model = _net()
    snap = state_snapshot(model)
    data = SMALL if method == "thinet" else None
    opts = {"scope": "all", "calib_batches": 2} if method == "thinet" else {}
    net, rep = prune_layerwise(model, X, method, ratio, data, epochs_per_step=0, **opts)
    one = surgery.prune(model, X, method, ratio, data, **opts)
    assert _shapes(net) == _shapes(one)
    assert [(s["size"], s["kept"]) for s in rep["steps"]] == [(8, 8 - int(ratio * 8)), (12, 12 - int(ratio * 12)),
                                                             (6, 6 - int(ratio * 6))]
    assert [p.options["only_layers"] for p in rep["plans"]] == [["c1"], ["c2"], ["c4"]]
    assert type(net) is Chain and rep["macs"]["after"] < rep["macs"]["before"]
    assert_same_state(model, snap)


@pytest.fixture
def spy():
    """A data-driven method that records the widths of the model it scores and the inputs it is fed."""
    seen = []

    def fn(ctx):
        widths = tuple(m.out_channels for m in ctx.model.modules() if isinstance(m, nn.Conv2d))
        seen.append((widths, tuple(g.id for g in ctx.groups), ctx.model.b4.running_mean.clone()))
        return {g.id: np.arange(g.size, dtype=np.float64)[::-1].copy() for g in ctx.groups}

    register_method("spy-layerwise", "test spy", needs=("data",))(fn)
    yield seen
    del _METHODS["spy-layerwise"]


def test_a_data_method_scores_each_group_on_the_pruned_fine_tuned_model(spy):
    model = _net()
    bn_before = model.b4.running_mean.clone()
    net, rep = prune_layerwise(model, X, "spy-layerwise", 0.5, SMALL, epochs_per_step=1, final_epochs=1, config=CFG)
    assert [w for w, _, _ in spy] == [(6, 8, 12, 12), (6, 4, 12, 12), (6, 4, 6, 6)]  # c4, c1, c2, c3
    assert all(len(groups) == 1 for _, groups, _ in spy)  # only the step's group is scored
    # b4 is untouched by the first step's plan: only the step's fine-tuning moved its statistics
    assert torch.equal(spy[0][2], bn_before) and not torch.allclose(spy[1][2], bn_before)
    assert [s["kept"] for s in rep["steps"]] == [4, 6, 3]
    assert (net.c1.out_channels, net.c2.out_channels, net.c4.out_channels) == (4, 6, 3)
    assert all(0.0 <= s["accuracy"] <= 1.0 for s in rep["steps"]) and len(rep["history"]["finetune"]) == 1
    assert torch.equal(model.b4.running_mean, bn_before)  # fine-tuning happened on a copy


def test_one_shot_options_are_refused():
    with pytest.raises(PlanError, match="^the layer-by-layer schedule prunes each group at its own ratio"):
        prune_layerwise(_net(), X, "l1", 0.5, epochs_per_step=0, target_macs=0.5)


def test_cli_layerwise(tmp_path):
    src, out = tmp_path / "chain.pt", tmp_path / "out.pt"
    surgery.save(_net(), src, example_inputs=X)
    r = CliRunner().invoke(app, ["prune", str(src), "--input-shape", "1,1,8,8", "--schedule", "layerwise", "--method",
                                 "thinet", "--data", "digits", "--calib-batches", "2", "--step-epochs", "1", "--batch-size", "256",
                                 "--finetune-epochs", "1", "--out", str(out)])
    assert r.exit_code == 0, r.stderr or r.stdout
    assert "layer by layer" in r.stdout and "after 1 final epoch(s)" in r.stdout
    pruned = surgery.load(out)  # thinet's default scope leaves the residual group (c2, c3) whole
    assert (pruned.c1.out_channels, pruned.c2.out_channels, pruned.c4.out_channels) == (4, 12, 3)
    bad = CliRunner().invoke(app, ["prune", str(src), "--input-shape", "1,1,8,8", "--schedule", "layerwise",
                                   "--plan-out", str(tmp_path / "p.json")])
    assert bad.exit_code == 1
    assert "--schedule layerwise makes one plan per group: --plan and --plan-out need --schedule oneshot" in bad.stderr
    bad = CliRunner().invoke(app, ["prune", str(src), "--input-shape", "1,1,8,8", "--schedule", "stepwise"])
    assert bad.exit_code == 1 and "unknown schedule 'stepwise'; known schedules: oneshot, layerwise" in bad.stderr
