"""Every registered method is reachable from the command line, with the built-in calibration data
where it needs data; method options, MACs targets and channel rounding reach the plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import surgery
from surgery.cli import app
from surgery.methods import get_method

SHAPE = ["--input-shape", "1,1,16,16"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from samples.resnet_mini import resnet_mini

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "mini.pt"
    surgery.save(resnet_mini().eval(), path)
    return path


def _prune(model_file: Path, tmp: Path, *extra: str):
    plan = tmp / "plan.json"
    r = CliRunner().invoke(app, ["prune", str(model_file), *SHAPE, "--out", str(tmp / "out.pt"), "--plan-out", str(plan), *extra])
    assert r.exit_code == 0, r.stderr or r.stdout
    return json.loads(plan.read_text()), surgery.load(tmp / "out.pt")


@pytest.mark.parametrize("method", surgery.methods())
def test_every_method_prunes_from_the_cli(method, model_file, tmp_path):
    data = ["--data", "digits", "--calib-batches", "2"] if get_method(method).needs_data else []
    plan, pruned = _prune(model_file, tmp_path, "--method", method, "--ratio", "0.5", *data)
    assert plan["method"] == method and plan["groups"], plan.get("notes")
    x = torch.randn(2, 1, 16, 16)
    assert pruned(x).shape == (2, 10)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in surgery.load(model_file).parameters())
    if method == "thinet":
        assert any("fold" in g for g in plan["groups"])  # least-squares scales reach the plan


def test_method_option_target_macs_and_round_to_reach_the_plan(model_file, tmp_path):
    plan, pruned = _prune(model_file, tmp_path, "--method", "random", "--option", "seed=5", "--target-macs", "0.5", "--round-to", "4")
    assert plan["options"]["seed"] == 5 and plan["options"]["target_macs"] == 0.5 and plan["options"]["round_to"] == 4
    assert all(g["size"] < 4 or len(g["keep"]) % 4 == 0 for g in plan["groups"])
    x = torch.randn(1, 1, 16, 16)
    ratio = surgery.stats(pruned, x).macs / surgery.stats(surgery.load(model_file), x).macs
    assert abs(ratio - 0.5) < 0.06  # rounding to 4 channels coarsens the bisection's steps


def test_methods_name_describes_paper_needs_and_options():
    r = CliRunner().invoke(app, ["methods", "thinet"])
    assert r.exit_code == 0
    for text in ("ThiNet", "needs: data", "samples_per_image", "scope", "ICCV 2017"):
        assert text in r.stdout, text
    bad = CliRunner().invoke(app, ["methods", "thinett"])
    assert bad.exit_code == 1 and "unknown method 'thinett' (did you mean 'thinet'?)" in bad.stderr


@pytest.mark.parametrize("method", surgery.methods())
def test_target_macs_works_with_every_method(method):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from samples.resnet_mini import resnet_mini
    from surgery.calibration.data import digits

    torch.manual_seed(0)
    model, x = resnet_mini().eval(), torch.randn(1, 1, 16, 16)
    xs, ys = digits((1, 1, 16, 16))
    opts = {"scope": "all"} if method.startswith("thinet") else {}
    data = (xs[:64], ys[:64]) if get_method(method).needs_data else None
    p = surgery.plan(model, x, method, data=data, target_macs=0.6, **opts)
    got = surgery.stats(surgery.apply(model, p), x).macs / surgery.stats(model, x).macs
    assert abs(got - 0.6) <= 0.02, (method, got)
