"""The training recipes end to end on scikit-learn's digits (small, fast): C-SGD merges without loss
after centripetal training, SWP's stripe model equals its trained skeleton model, Pruning from
Scratch meets its MACs budget; every recipe leaves the user's model untouched."""

from __future__ import annotations

import math

import torch
from torch import nn

import surgery
from helpers import assert_same_state, state_snapshot
from surgery.calibration.data import digits
from surgery.layers import StripeConv
from surgery.train import TrainConfig, train_csgd, train_from_scratch, train_swp


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


DATA = digits((1, 1, 8, 8))
X = torch.randn(1, 1, 8, 8)
CFG = TrainConfig(lr=0.05, batch_size=64, progress=False, weight_decay=1e-4)


def test_csgd_merge_after_centripetal_training_loses_nothing():
    model = _net()
    snap = state_snapshot(model)
    cfg = TrainConfig(lr=0.05, batch_size=64, progress=False, weight_decay=1e-4, schedule="constant")
    pruned, rep = train_csgd(model, X, DATA, ratio=0.5, eps=3.0, epochs=4, config=cfg)  # strong eps: converged clusters
    assert rep["params"]["after"] < rep["params"]["before"] and pruned[0].out_channels == 8
    # the merge costs (almost) nothing: kernels have converged; BN vectors move at 0.1 eps, as in the
    # authors' code (exactness after full convergence is checked in test_csgd.py)
    assert abs(rep["accuracy"]["pruned"] - rep["accuracy"]["trained"]) <= 0.01
    assert rep["accuracy"]["trained"] > 0.5
    assert_same_state(model, snap)


def test_swp_stripe_model_equals_the_trained_skeleton_model():
    model = _net()
    snap = state_snapshot(model)
    pruned, rep = train_swp(model, X, DATA, alpha=0.05, delta=0.32, epochs=3, config=CFG)  # strong L1: a short run
    assert isinstance(pruned[0], StripeConv) and isinstance(pruned[3], StripeConv)
    assert rep["accuracy"]["pruned"] == rep["accuracy"]["trained"]
    assert any(live < total for live, total in rep["stripes"].values()) and all(live > 0 for live, _ in rep["stripes"].values())
    assert rep["macs"]["after"] < rep["macs"]["before"]
    assert_same_state(model, snap)


def test_swp_with_a_macs_target_removes_dead_filters_and_meets_the_budget():
    model = _net()
    small = (DATA[0][:600], DATA[1][:600])
    pruned, rep = train_swp(model, X, small, alpha=0.01, delta=0.01, epochs=1, config=CFG, target_macs=0.5,
                            finetune_epochs=1)
    kept = rep["macs"]["after"] / rep["macs"]["before"]
    assert 0.4 < kept <= 0.5 and rep["threshold"] >= 0.01
    live = {name: n for name, (n, _) in rep["stripes"].items()}
    assert (pruned[0].n_stripes, pruned[3].n_stripes) == (live["0"], live["3"])
    # every filter left has a live stripe: the others were removed as channels
    assert 16 - pruned[0].out_channels + 16 - pruned[3].out_channels == rep["dead_channels"]
    for conv in (pruned[0], pruned[3]):
        assert sorted(set(conv.stripe_out.tolist())) == list(range(conv.out_channels))
    assert pruned(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    # the stripe model fine-tunes (the stripe counts above are after it: its structure stays)
    assert len(rep["history"]["finetune"]) == 1 and rep["accuracy"]["finetuned"] > rep["accuracy"]["pruned"]


def test_from_scratch_meets_the_budget_and_retrains():
    model = _net()
    pruned, rep = train_from_scratch(model, X, DATA, target_macs=0.5, gate_epochs=1, epochs=2, config=CFG,
                                     budget_train=True)
    kept = rep["macs"]["after"] / rep["macs"]["before"]
    assert abs(kept - 0.5) < 0.1 and rep["epochs"] == math.ceil(2 / kept) and rep["accuracy"]["trained"] > 0.3  # Scratch-B


def test_cli_train_runs_every_method(tmp_path):
    import sys
    from pathlib import Path

    from typer.testing import CliRunner

    from surgery.cli import app

    root = str(Path(__file__).resolve().parent.parent)
    sys.path.insert(0, root)
    try:
        for method, extra in (("csgd", ["--eps", "0.5"]), ("swp", ["--alpha", "0.05", "--delta", "0.3"]),
                              ("from-scratch", ["--gate-epochs", "1", "--target-macs", "0.5"])):
            out = tmp_path / f"{method}.pt"
            r = CliRunner().invoke(app, ["train", "samples.resnet_mini:resnet_mini", "--input-shape", "1,1,16,16",
                                         "--method", method, "--data", "digits", "--epochs", "1", "--out", str(out), *extra])
            assert r.exit_code == 0, (method, r.stderr or r.stdout)
            assert "params" in r.stdout and out.exists()
            model = surgery.load(out)
            assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
        bad = CliRunner().invoke(app, ["train", "samples.resnet_mini:resnet_mini", "--input-shape", "1,1,16,16",
                                       "--method", "nope", "--data", "digits", "--epochs", "1"])
        assert bad.exit_code == 1 and "unknown training method 'nope'; known: slimming, csgd, swp, from-scratch" in bad.stderr
    finally:
        sys.path.remove(root)
