"""Coverage figures and the person-readable group table of ``surgery graph``."""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

import surgery
from surgery.cli import app
from surgery.coverage import coverage


class Blocked(nn.Module):
    """conv -> an op with no rule (torch.cumsum over channels) -> conv: the first group is blocked."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.cumsum(self.a(x), dim=1))))


def test_resnet18_coverage_counts_every_parameter_and_names_the_output():
    model = torchvision.models.resnet18()
    cov = coverage(surgery.trace(model, torch.randn(1, 3, 64, 64)))
    assert cov.params == sum(p.numel() for p in model.parameters())
    assert cov.params - cov.prunable_params == 1000  # fc.bias: sized by the classes only
    assert [(b.reason, b.op, b.params) for b in cov.blockers] == [("MODEL_OUTPUT", "model output", 1000)]


def test_blocking_op_is_named_with_its_parameter_count():
    net = Blocked()
    cov = coverage(surgery.trace(net, torch.randn(1, 3, 12, 12)))
    # b and c.weight are reachable through the b->c group; a only through the blocked group; c.bias is
    # sized by the model output
    assert cov.params - cov.prunable_params == net.a.weight.numel() + net.a.bias.numel() + net.c.bias.numel()
    (b,) = [b for b in cov.blockers if b.reason == "UNSUPPORTED_OP"]
    assert b.op == "cumsum" and b.groups == 1 and b.params == 8 * 3 * 9 + 8


def test_graph_table_folds_one_channel_groups_and_prints_coverage(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["graph", "torchvision:vit_b_16", "--input-shape", "1,3,224,224"])
    assert r.exit_code == 0, r.output
    assert "one-channel groups (always kept; --all lists them)" in r.output
    assert "parameters in prunable groups: 86,566,656 of 86,567,656 (100.0%)" in r.output
    full = runner.invoke(app, ["graph", "torchvision:vit_b_16", "--all"])
    assert "one-channel groups" not in full.output and full.output.count("\n") > r.output.count("\n")
    rows = [ln for ln in r.output.splitlines() if ln.startswith("│")]
    flags = [ln.split("│")[3].strip() for ln in rows if ln.split("│")[3].strip() in ("yes", "no")]
    assert flags == sorted(flags, key=lambda f: f != "yes")  # prunable groups first
