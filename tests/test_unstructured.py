"""Unstructured magnitude pruning: exact sparsity, masks kept through SGD, CSR-where-smaller
checkpoints (int16/int32 indices, checksum), sparsity in stats, sparse Linear inference, the CLI."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import surgery
from surgery import checkpoint
from surgery.errors import ModelLoadError, PlanError, SurgeryError
from surgery.sparsity import UNSTRUCTURED, SparseLinear, magnitude_masks, masks_of, prunable_weights, sparse_inference
from surgery.stats import weight_sparsity
from surgery.train import Hooks, TrainConfig, fit
from surgery.train.masks import mask_hooks


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10)).eval()


X = torch.randn(2, 1, 8, 8)


def zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


# -- selection ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.97])
def test_global_removes_exactly_the_smallest(sparsity):
    net = convnet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = surgery.prune(net, X, method=UNSTRUCTURED, sparsity=sparsity)
    weights = prunable_weights(out)
    assert list(weights) == ["0.weight", "3.weight", "7.weight"]  # conv/linear weights only
    n = sum(w.numel() for w in weights.values())
    assert sum(zeros(w) for w in weights.values()) == int(sparsity * n)
    removed = torch.cat([net.get_parameter(k).detach()[w == 0].abs() for k, w in weights.items()])
    kept = torch.cat([w.detach()[w != 0].abs() for w in weights.values()])
    if removed.numel():
        assert removed.max() <= kept.min()  # one global threshold
    for k, v in out.state_dict().items():  # biases, BN and the user's model untouched
        if k not in weights:
            assert torch.equal(v, before[k]), k
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert type(out) is nn.Sequential and out[0].weight.shape == net[0].weight.shape
    masks = masks_of(out)
    assert all(torch.equal(masks[k], weights[k] != 0) for k in weights)


def test_layer_scope_prunes_every_tensor_to_the_sparsity():
    out = surgery.prune(convnet(), X, method=UNSTRUCTURED, sparsity=0.75, scope="layer")
    assert [zeros(w) for w in prunable_weights(out).values()] == [int(0.75 * 72), int(0.75 * 1152), int(0.75 * 640)]


def test_ties_are_cut_to_the_exact_count():
    net = nn.Sequential(nn.Linear(10, 10, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(0.5)
    masks = magnitude_masks(net, 0.33)
    assert int((~masks["0.weight"]).sum()) == 33


def test_graph_output_and_option_errors():
    net = convnet()
    gm = surgery.prune(net, X, method=UNSTRUCTURED, sparsity=0.5, output="graph")
    assert isinstance(gm, torch.fx.GraphModule)
    assert zeros(gm.get_parameter("3.weight")) + zeros(gm.get_parameter("0.weight")) + zeros(gm.get_parameter("7.weight")) == 932
    cases = [
        (dict(sparsity=1.0), r"sparsity must be a number in \[0, 1\)"),
        (dict(sparsity=-0.1), r"sparsity must be a number in \[0, 1\)"),
        (dict(), r"needs sparsity="),
        (dict(sparsity=0.5, scope="row"), r"unknown scope 'row'; known scopes: global, layer"),
        (dict(sparsity=0.5, policy="global"), r"option\(s\) policy do not apply to method 'magnitude-unstructured'"),
        (dict(sparsity=0.5, output="tree"), r"unknown output 'tree'"),
        (dict(sparsity=0.5, data=[X]), r"needs no data or loss"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(PlanError, match=pattern):
            surgery.prune(net, X, method=UNSTRUCTURED, **kwargs)
    with pytest.raises(PlanError, match="removes single weights, not channels, and makes no channel plan"):
        surgery.plan(net, X, method=UNSTRUCTURED, sparsity=0.5)
    with torch.no_grad():
        bad = convnet()
        bad[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(PlanError, match="weight 0.weight holds NaN"):
        surgery.prune(bad, X, method=UNSTRUCTURED, sparsity=0.5)


# -- fine-tuning keeps the masks -----------------------------------------------------------------
def test_masks_survive_sgd_with_momentum_and_weight_decay():
    net = surgery.prune(convnet(), X, method=UNSTRUCTURED, sparsity=0.8)
    start = {k: w.detach().clone() for k, w in prunable_weights(net).items()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 10, (96,), generator=g)
    cfg = TrainConfig(epochs=2, lr=0.1, momentum=0.9, weight_decay=1e-2, batch_size=16, progress=False)
    free = surgery.prune(convnet(), X, method=UNSTRUCTURED, sparsity=0.8)
    fit(free, (x, y), None, cfg)  # control: without the hooks the zeros move
    assert sum(zeros(w) for w in prunable_weights(free).values()) < sum(zeros(w) for w in start.values()) // 2
    hist = fit(net, (x, y), None, cfg, mask_hooks(masks_of(net)))
    assert hist.steps == 12
    for k, w in prunable_weights(net).items():
        assert torch.equal(w == 0, start[k] == 0), k  # every masked weight exactly 0, the rest non-zero
        kept = start[k] != 0
        assert (w[kept] != start[k][kept]).float().mean() > 0.99, k  # the unmasked ones trained


def test_mask_hooks_refuse_masks_of_another_model():
    hooks = mask_hooks({"nope.weight": torch.ones(2, 2, dtype=torch.bool)})
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    with pytest.raises(SurgeryError, match="mask nope.weight \\(2, 2\\) matches no parameter"):
        fit(convnet(), (x, y), None, TrainConfig(epochs=1, batch_size=8, progress=False), hooks)
    assert isinstance(hooks, Hooks)


# -- checkpoints ----------------------------------------------------------------------------------
def test_resnet18_at_90_percent_csr_is_under_a_quarter_and_exact(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    sparse = surgery.prune(model, torch.randn(1, 3, 64, 64), method=UNSTRUCTURED, sparsity=0.9)
    x = torch.randn(1, 3, 64, 64)
    surgery.save(sparse, tmp_path / "dense.pt", example_inputs=x)
    surgery.save(sparse, tmp_path / "csr.pt", format="csr", example_inputs=x)
    ratio = os.path.getsize(tmp_path / "csr.pt") / os.path.getsize(tmp_path / "dense.pt")
    assert ratio < 0.25, ratio  # about 0.16 with int16 column indices (int64 indices: about 0.31)
    back = surgery.load(tmp_path / "csr.pt")
    with torch.no_grad():
        assert torch.equal(back(x), sparse(x))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), sparse.state_dict().values()))
    with safe_open(str(tmp_path / "csr.pt"), "pt") as f:
        table = json.loads(f.metadata()["model"])["tensors"]
        assert f.get_tensor("conv1.weight::col").dtype == torch.int16
        assert f.get_tensor("conv1.weight::crow").dtype == torch.int32
    assert table["fc.weight"]["layout"] == "csr" and table["bn1.weight"]["layout"] == "dense"


@pytest.mark.filterwarnings("ignore:saving Sequential as a graph only")
def test_csr_only_where_smaller(tmp_path):
    """Storage only: the layers need not chain (no example input, no forward)."""
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(40000, 1, bias=False))
    with torch.no_grad():
        net[0].weight.mul_(torch.rand(64, 64) < 0.1)  # sparse -> CSR
        net[1].weight.mul_(torch.rand(64, 64) < 0.7)  # 30% zeros: CSR (6 bytes a non-zero) would be larger
        net[2].weight.mul_(torch.rand(1, 40000) < 0.05)  # a row past 32768 entries: int32 column indices
    checkpoint.save(net, tmp_path / "m.pt", format="csr")
    with safe_open(str(tmp_path / "m.pt"), "pt") as f:
        table = json.loads(f.metadata()["model"])["tensors"]
        assert f.get_tensor("2.weight::col").dtype == torch.int32
    assert {k: v["layout"] for k, v in table.items()} == {
        "0.weight": "csr", "0.bias": "dense", "1.weight": "dense", "1.bias": "dense", "2.weight": "csr"}
    back = checkpoint.load(tmp_path / "m.pt")
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), net.state_dict().values()))


def _rewrite(src: Path, dst: Path, edit_meta=None, edit_tensors=None) -> None:
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(src))
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(dst), metadata=meta)


def test_checksum_catches_a_changed_weight_and_version_1_files_load(tmp_path):
    net = surgery.prune(convnet(), X, method=UNSTRUCTURED, sparsity=0.9)
    checkpoint.save(net, tmp_path / "m.pt", format="csr", example_inputs=X)

    def bump(t):
        t["3.weight::values"][5] += 1e-3

    _rewrite(tmp_path / "m.pt", tmp_path / "bad.pt", edit_tensors=bump)
    with pytest.raises(ModelLoadError, match=r"bad.pt: checksum mismatch: the file is corrupt"):
        surgery.load(tmp_path / "bad.pt")
    _rewrite(tmp_path / "m.pt", tmp_path / "nosum.pt", edit_meta=lambda m: m.pop("checksum"))
    with pytest.raises(ModelLoadError, match="checksum mismatch"):
        surgery.load(tmp_path / "nosum.pt")

    def legacy(t):  # version 1 wrote int64 indices and no checksum
        for k in [k for k in t if k.endswith(("::crow", "::col"))]:
            t[k] = t[k].long()

    _rewrite(tmp_path / "m.pt", tmp_path / "v1.pt", edit_meta=lambda m: (m.pop("checksum"), m.update(format_version="1")),
             edit_tensors=legacy)
    back = surgery.load(tmp_path / "v1.pt")
    with torch.no_grad():
        assert torch.equal(back(X), net(X))


# -- statistics and sparse inference --------------------------------------------------------------
def test_weight_sparsity_counts():
    net = surgery.prune(convnet(), X, method=UNSTRUCTURED, sparsity=0.5)
    s = weight_sparsity(net)
    assert (s.prunable, s.prunable_zeros) == (1864, 932)
    assert s.params == 1864 + 8 + 8 + 8 + 16 + 10  # + conv/linear biases and BN's weight and bias
    assert s.zeros == 932 + 8 and s.of_prunable == 0.5 and abs(s.overall - 940 / 1914) < 1e-12  # BN bias starts at 0


def test_sparse_linear_matches_dense_and_only_where_sparse_enough():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    net = surgery.prune(net, torch.randn(1, 32), method=UNSTRUCTURED, sparsity=0.93, scope="layer")
    with torch.no_grad():
        net[2].weight.copy_(torch.randn(16, 64))  # dense again: stays nn.Linear
    fast = sparse_inference(net, min_sparsity=0.9)
    assert isinstance(fast[0], SparseLinear) and type(fast[2]) is nn.Linear and type(net[0]) is nn.Linear
    x = torch.randn(5, 3, 32)
    with torch.no_grad():
        assert torch.allclose(fast(x), net(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(PlanError, match="min_sparsity must be a number in \\[0, 1\\]"):
        sparse_inference(net, min_sparsity=2)


# -- command line ---------------------------------------------------------------------------------
def run(args: list[str], cwd: Path):
    from typer.testing import CliRunner

    from surgery.cli import app

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, args)
    finally:
        os.chdir(old)


def test_cli_prune_stats_finetune_keep_the_zeros(tmp_path):
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10)).eval()
    surgery.save(net, tmp_path / "net.pt", metadata={"input_shape": [1, 1, 8, 8]}, example_inputs=X)
    r = run(["prune", "net.pt", "--method", UNSTRUCTURED, "--sparsity", "0.8", "--format", "csr", "--out", "s.pt",
             "--data", "digits", "--finetune-epochs", "1"], tmp_path)
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "(masks kept)" in r.stdout and "1,491 of 1,864 (79.99%)" in r.stdout
    s = surgery.load(tmp_path / "s.pt")
    assert sum(zeros(w) for w in prunable_weights(s).values()) == 1491
    r = run(["stats", "s.pt"], tmp_path)
    assert r.exit_code == 0, r.stderr
    assert re.search(r"zero weights\s*│\s*\d+\.\d+% of all parameters, 79\.99% of Linear/conv weights", r.stdout), r.stdout
    assert f"{os.path.getsize(tmp_path / 's.pt'):,} B" in r.stdout
    r = run(["finetune", "s.pt", "--data", "digits", "--epochs", "1", "--lr", "0.05", "--out", "ft.pt"], tmp_path)
    assert r.exit_code == 0, r.stderr
    ft = surgery.load(tmp_path / "ft.pt")
    assert checkpoint.read_metadata(tmp_path / "ft.pt")["method"] == UNSTRUCTURED
    for (k, a), b in zip(prunable_weights(s).items(), prunable_weights(ft).values()):
        assert torch.equal(a == 0, b == 0) and not torch.equal(a, b), k
    with safe_open(str(tmp_path / "ft.pt"), "pt") as f:
        assert "2.weight::col" in f.keys()  # still CSR


@pytest.mark.parametrize("args, pattern", [
    (["--method", "l1", "--sparsity", "0.5"], "--sparsity applies to --method magnitude-unstructured only"),
    (["--method", UNSTRUCTURED], "needs --sparsity"),
    (["--method", UNSTRUCTURED, "--sparsity", "1.5"], r"sparsity must be a number in \[0, 1\)"),
    (["--method", UNSTRUCTURED, "--sparsity", "0.5", "--global"], "--global select channels and do not apply"),
    (["--method", UNSTRUCTURED, "--sparsity", "0.5", "--scope", "x"], "unknown scope 'x'"),
    (["--method", UNSTRUCTURED, "--sparsity", "0.5", "--schedule", "layerwise"], "--schedule select channels"),
])
def test_cli_errors_are_one_line(tmp_path, args, pattern):
    surgery.save(convnet(), tmp_path / "net.pt", metadata={"input_shape": [1, 1, 8, 8]}, example_inputs=X)
    r = run(["prune", "net.pt", *args, "--out", "o.pt"], tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and re.search(pattern, lines[0]), r.stderr
    assert not (tmp_path / "o.pt").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
