"""Sensitivity analysis (Li et al.): each group pruned alone at each ratio, measured on data.

A tiny CNN is trained for a few steps on scikit-learn's digits so that accuracy means something;
two channels of its first layer are then made dead by hand (zero filter, BN gamma 0, beta < 0, so
ReLU outputs exactly 0), which L1 ranks lowest: pruning only those must cost nothing.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from surgery.calibration.data import digits
from surgery.errors import PlanError
from surgery.sensitivity import CSV_HEADER, SensitivityResult, SensitivityRow

DEAD = [2, 5]  # channels of the first conv made dead
RATIOS = (0.1, 0.25, 0.5, 0.7)
SHAPE = (1, 1, 8, 8)


def make_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


@pytest.fixture(scope="module")
def trained():
    """(model in eval mode with dead channels, held-out x, y)."""
    torch.manual_seed(0)
    x, y = digits(SHAPE)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:1656], y[1400:1656]
    net = make_net()
    with torch.no_grad():  # dead from the start: ReLU gives 0, so no gradient ever revives them
        net[0].weight[DEAD] = 0.0
        net[1].weight[DEAD] = 0.0
        net[1].bias[DEAD] = -1.0
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    net.train()
    for step in range(200):
        i = torch.randint(0, len(xtr), (64,))
        opt.zero_grad()
        F.cross_entropy(net(xtr[i]), ytr[i]).backward()
        opt.step()
    net.eval()
    assert float(net[0].weight.detach()[DEAD].abs().sum()) == 0.0 and bool((net[1].bias.detach()[DEAD] < 0).all())
    return net, xte, yte


@pytest.fixture(scope="module")
def labelled(trained):
    net, x, y = trained
    state = {k: v.clone() for k, v in net.state_dict().items()}
    result = surgery.sensitivity(net, x[:1], (x, y), ratios=RATIOS, method="l1")
    return result, state


def _group_of(result: SensitivityResult, producer: str) -> list[SensitivityRow]:
    return next(rows for rows in result.curves().values() if rows[0].producer == producer)


def test_baseline_equals_unpruned_model(trained, labelled):
    net, x, y = trained
    result, state = labelled
    with torch.no_grad():
        out = net(x)
    assert result.metric == "accuracy"
    assert result.baseline["loss"] == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-5)
    assert result.baseline["accuracy"] == pytest.approx(float((out.argmax(1) == y).float().mean()), abs=1e-9)
    assert result.baseline["accuracy"] > 0.6, "the net was trained: accuracy means something"
    assert result.baseline["error"] == 0.0 and result.samples == len(x)
    assert not net.training
    for k, v in net.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, state[k]), k


def test_rows_prune_one_group_at_int_ratio_times_size(trained, labelled):
    net, x, _ = trained
    result, _ = labelled
    prunable = [g for g in surgery.trace(net, x[:1]).groups if g.prunable]
    assert len(prunable) == 2  # the first and the second conv's channels
    assert len(result.rows) == len(prunable) * len(RATIOS)
    assert [rows[0].producer for rows in result.curves().values()] == ["0", "3"]
    for gid, rows in result.curves().items():
        assert [r.ratio for r in rows] == list(RATIOS)
        for r in rows:
            assert r.kept == r.size - int(r.ratio * r.size)
            assert r.loss is not None and 0.0 <= r.accuracy <= 1.0 and r.error >= 0.0
    assert _group_of(result, "0")[0].size == 8 and _group_of(result, "3")[0].size == 16


def test_dead_channels_cost_nothing(labelled):
    result, _ = labelled
    rows = {r.ratio: r for r in _group_of(result, "0")}
    assert rows[0.25].kept == 6  # exactly the two dead channels (L1 = 0) go
    assert rows[0.25].error < 1e-5
    assert rows[0.25].accuracy == result.baseline["accuracy"]
    assert rows[0.25].loss == pytest.approx(result.baseline["loss"], rel=1e-5)
    assert rows[0.1].error < 1e-5  # int(0.1 * 8) = 1: one dead channel
    assert rows[0.7].error > 1e-2  # live channels gone: the analysis does measure something


def test_without_labels_measures_output_error(trained):
    net, x, _ = trained
    result = surgery.sensitivity(net, x[:1], x[:64], ratios=(0.25, 0.5), groups=["0"])
    assert result.metric == "error" and result.baseline["accuracy"] is None and result.baseline["loss"] is None
    rows = {r.ratio: r for r in result.rows}
    assert set(rows) == {0.25, 0.5} and all(r.accuracy is None and r.loss is None for r in result.rows)
    assert rows[0.25].error < 1e-5 and rows[0.5].error > 1e-3
    assert result.layer_ratios(max_error=1e-4) == {"0": 0.25}
    with pytest.raises(PlanError, match="max_drop needs labelled data"):
        result.layer_ratios(max_drop=0.01)


def test_custom_loss_and_bad_options(trained):
    net, x, y = trained
    calls = []

    def loss(out, labels):
        calls.append(len(labels))
        return F.nll_loss(F.log_softmax(out, 1), labels)

    result = surgery.sensitivity(net, x[:1], (x[:40], y[:40]), ratios=(0.5,), groups=[1], loss=loss)
    assert sum(calls) == 40 * 2  # baseline + one pruned model, every sample once
    assert len(result.rows) == 1 and result.rows[0].group == 1
    with pytest.raises(PlanError, match="does not apply to a sensitivity analysis"):
        surgery.sensitivity(net, x[:1], x, policy="global")
    with pytest.raises(PlanError, match=r"ratio must be .*\[0, 1\)"):
        surgery.sensitivity(net, x[:1], x, ratios=(0.5, 1.5))
    with pytest.raises(PlanError, match="needs calibration data"):
        surgery.sensitivity(net, x[:1], None)
    with pytest.raises(PlanError, match="no prunable group"):
        surgery.sensitivity(net, x[:1], x, groups=["nothing.*"])


def _row(gid, name, ratio, acc, error=0.0, size=10):
    return SensitivityRow(gid, name, name, size, ratio, size - int(ratio * size), 1.0, acc, error)


def test_layer_ratios_rule():
    """Largest ratio passing with every smaller one; 0.0 for a group hurt at the first ratio."""
    rows = [
        _row(1, "a", 0.1, 0.90), _row(1, "a", 0.3, 0.895), _row(1, "a", 0.5, 0.80),
        _row(2, "b", 0.1, 0.85), _row(2, "b", 0.3, 0.90), _row(2, "b", 0.5, 0.90),  # first ratio fails
        _row(3, "c", 0.1, 0.90), _row(3, "c", 0.3, 0.70), _row(3, "c", 0.5, 0.90),  # a lucky late point
        _row(4, "", 0.1, 0.90), _row(4, "", 0.3, 0.90), _row(4, "", 0.5, 0.90),  # no unique name: left out
    ]
    result = SensitivityResult("l1", (0.1, 0.3, 0.5), {"loss": 1.0, "accuracy": 0.90, "error": 0.0}, rows)
    assert result.layer_ratios(max_drop=0.01) == {"a": 0.3, "b": 0.0, "c": 0.1}
    assert result.layer_ratios(max_drop=0.2) == {"a": 0.5, "b": 0.5, "c": 0.5}
    assert result.layer_ratios() == {"a": 0.3, "b": 0.0, "c": 0.1}  # default max_drop 0.01
    text = result.layer_ratios_text(max_drop=0.01)
    assert [ln for ln in text.splitlines() if not ln.startswith("#")] == ["a=0.3", "b=0", "c=0.1"]
    with pytest.raises(PlanError, match="max_drop must be"):
        result.layer_ratios(max_drop=-1)


def test_plot_and_csv_files(labelled, tmp_path):
    result, _ = labelled
    result.plot(tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result.to_csv(tmp_path / "s.csv")
    with open(tmp_path / "s.csv", newline="") as f:
        table = list(csv.reader(f))
    assert tuple(table[0]) == CSV_HEADER and len(table) == 1 + len(result.rows)
    # many groups: the legend is capped and the plot still renders
    many = [_row(g, f"layer{g}", r, 0.9 - g * r / 100) for g in range(30) for r in (0.2, 0.5)]
    big = SensitivityResult("l1", (0.2, 0.5), {"loss": 1.0, "accuracy": 0.9, "error": 0.0}, many)
    assert big.png(legend_max=8)[:4] == b"\x89PNG"


# -- command line ------------------------------------------------------------------------------------
def invoke(args: list[str], cwd: Path):
    from typer.testing import CliRunner

    from surgery.cli import app

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)


def stderr_lines(r) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def cli_files(trained, tmp_path_factory):
    net, x, y = trained
    work = tmp_path_factory.mktemp("sens_cli")
    torch.save(net, work / "net.pt")
    np.savez(work / "data.npz", x=x.numpy(), y=y.numpy())
    return work


@pytest.fixture(scope="module")
def cli_run(cli_files):
    work = cli_files
    r = invoke(["sensitivity", "net.pt", "--input-shape", "1,1,8,8", "--data", "data.npz", "--ratios", "0.25,0.5,0.7",
                "--out", "sens.png", "--emit-layer-ratios", "ratios.txt", "--max-drop", "0.02"], work)
    assert r.exit_code == 0, r.stderr + r.stdout
    return r, work


def test_cli_writes_plot_csv_and_table(cli_run):
    r, work = cli_run
    assert (work / "sens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(work / "sens.csv", newline="") as f:  # default: the plot's path with .csv
        table = list(csv.reader(f))
    assert tuple(table[0]) == CSV_HEADER and len(table) == 1 + 2 * 3
    assert "unpruned" in r.stdout and "0.25" in r.stdout and "%" in r.stdout
    assert not list(work.glob(".*.tmp"))


def test_emitted_layer_ratios_round_trip_through_prune(cli_run):
    r, work = cli_run
    lines = [ln for ln in (work / "ratios.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    emitted = {k: float(v) for k, v in (ln.split("=") for ln in lines)}
    assert set(emitted) == {"0", "3"}
    assert emitted["0"] >= 0.25  # only the dead channels go at 0.25: no accuracy lost
    p = invoke(["prune", "net.pt", "--input-shape", "1,1,8,8", "--ratio", "0.5", "--layer-ratio", "@ratios.txt",
                "--plan-out", "plan.json"], work)
    assert p.exit_code == 0, p.stderr + p.stdout
    plan = surgery.Plan.from_json((work / "plan.json").read_text())
    assert plan.options["layer_ratios"] == emitted
    net = torch.load(work / "net.pt", weights_only=False)
    kept = {g.id: len(g.keep) for g in plan.groups}
    graph = surgery.trace(net, torch.zeros(SHAPE))
    for name, ratio in emitted.items():
        g = next(g for g in graph.groups if g.prunable and name in g.producers)
        assert kept.get(g.id, g.size) == g.size - int(ratio * g.size), (name, ratio)


@pytest.mark.parametrize("case", ["ratio_too_big", "no_data", "bad_ratio_text", "bad_layer_ratio_file"])
def test_cli_bad_input_is_one_line(case, cli_files):
    work = cli_files
    (work / "bad.txt").write_text("# fine\n0=0.5\n\n3 = oops\n")
    base = ["sensitivity", "net.pt", "--input-shape", "1,1,8,8", "--out", "bad.png"]
    args, pattern = {
        "ratio_too_big": ([*base, "--data", "data.npz", "--ratios", "1.5"], r"--ratios.*\[0, 1\).*1\.5"),
        "no_data": (base, r"needs --data"),
        "bad_ratio_text": ([*base, "--data", "data.npz", "--ratios", "0.1,x"], r"--ratios takes numbers"),
        "bad_layer_ratio_file": (["prune", "net.pt", "--input-shape", "1,1,8,8", "--layer-ratio", "@bad.txt"],
                                 r"bad\.txt:4: expected PATTERN=RATIO"),
    }[case]
    r = invoke(args, work)
    lines = stderr_lines(r)
    assert r.exit_code == 1, (r.exit_code, r.stderr, r.stdout)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert not (work / "bad.png").exists()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
