"""The trainer (surgery.train): DDP equivalence, resume, hooks, no-decay groups; network slimming;
the finetune command line. Small models, a few steps, scikit-learn digits or generated data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import surgery
from surgery.calibration.data import digits
from surgery.train import Hooks, TrainConfig, evaluate, fit, param_groups, slimmed_norms, slimming, sparsity_hook, split

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def vgg(width=(16, 32, 32)) -> nn.Sequential:
    def blk(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    torch.manual_seed(0)
    a, b, c = width
    return nn.Sequential(*blk(1, a), nn.MaxPool2d(2), *blk(a, b), nn.MaxPool2d(2), *blk(b, c), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(c, 10))


def small_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from torch import nn
    from surgery.train import TrainConfig, fit
    torch.set_num_threads(1)
    tmp = sys.argv[1]
    x, y, init = torch.load(f"{tmp}/data.pt", weights_only=True)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    net.load_state_dict(init)
    rank = os.environ["RANK"]
    cfg = TrainConfig(epochs=1, lr=0.1, momentum=0.9, batch_size=16, seed=3, checkpoint_dir=f"{tmp}/ck{rank}", progress=False)
    fit(net, (x, y), (x, y), cfg)
    torch.save(net.state_dict(), f"{tmp}/final{rank}.pt")
""")


def test_ddp_two_processes_equal_one(tmp_path):
    x, y = small_data(64)
    net = mlp()
    torch.save((x, y, net.state_dict()), tmp_path / "data.pt")
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(tmp_path / "ddp.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = TrainConfig(epochs=1, lr=0.1, momentum=0.9, batch_size=16, seed=3, progress=False)
    fit(net, (x, y), (x, y), cfg)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"final{rank}.pt", weights_only=True)
        for k, v in net.state_dict().items():
            torch.testing.assert_close(got[k], v, atol=1e-5, rtol=0)
    assert sorted(os.listdir(tmp_path / "ck0")) == ["best.pt", "last.pt"]
    assert not (tmp_path / "ck1").exists()  # only rank 0 writes


def test_resume_equals_uninterrupted(tmp_path):
    x, y = small_data(48)
    cfg = TrainConfig(epochs=3, lr=0.05, nesterov=True, warmup_epochs=0.5, batch_size=16, seed=5, label_smoothing=0.1,
                      progress=False)
    full = mlp()
    h_full = fit(full, (x, y), (x, y), cfg)
    half = mlp()
    ck = tmp_path / "ck"
    fit(half, (x, y), (x, y), TrainConfig(**{**cfg.__dict__, "checkpoint_dir": str(ck), "stop_after": 1}))
    state = torch.load(ck / "last.pt", weights_only=True)
    assert state["epoch"] == 0 and set(state) >= {"model", "optimizer", "scheduler", "rng"}
    torch.manual_seed(123)  # a different RNG state and fresh weights: resume restores both
    resumed = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    h = fit(resumed, (x, y), (x, y), TrainConfig(**{**cfg.__dict__, "resume": str(ck / "last.pt")}))
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert [r["epoch"] for r in h.epochs] == [0, 1, 2]
    assert h.epochs[-1]["train_loss"] == h_full.epochs[-1]["train_loss"]


def test_regulariser_adds_its_value_to_the_loss():
    x, y = small_data(32)
    cfg = TrainConfig(epochs=1, lr=0.1, batch_size=32, progress=False)
    a, b = mlp(), mlp()
    ha = fit(a, (x, y), None, cfg)
    hb = fit(b, (x, y), None, cfg, Hooks(regulariser=lambda m: torch.tensor(2.5)))
    assert hb.last["train_loss"] == pytest.approx(ha.last["train_loss"] + 2.5, abs=1e-6)
    for k, v in a.state_dict().items():  # a constant has no gradient
        assert torch.equal(b.state_dict()[k], v)
    c = mlp()  # a regulariser with a gradient does change the weights
    fit(c, (x, y), None, cfg, Hooks(regulariser=lambda m: 10 * m[0].weight.pow(2).sum()))
    assert not torch.equal(c[0].weight, a[0].weight)


def test_after_step_clamp_every_step():
    x, y = small_data(64)
    calls, seen = [], []

    def clamp(m):
        seen.append(float(m[0].weight.abs().max()))  # after the step, before the clamp
        for p in m.parameters():
            p.clamp_(-0.05, 0.05)
        calls.append(1)

    net = mlp()
    h = fit(net, (x, y), None, TrainConfig(epochs=2, lr=0.5, batch_size=16, progress=False), Hooks(after_step=clamp))
    assert len(calls) == h.steps == 8
    assert all(p.abs().max() <= 0.05 for p in net.parameters())
    assert max(seen[1:]) > 0.05  # the step moved weights out of the box and the hook brought them back


def test_no_decay_groups_hold_biases_and_norm_parameters():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(4 * 6 * 6), nn.Linear(144, 3))
    decay, no_decay = param_groups(net, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[4].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(net[0].bias), id(net[1].weight), id(net[1].bias),
                                                   id(net[3].weight), id(net[3].bias), id(net[4].bias)}


def test_split_is_deterministic_and_disjoint():
    x, y = small_data(50)
    (a, _), (b, _) = split(x, y, 0.2, seed=4)
    (a2, _), (b2, _) = split(x, y, 0.2, seed=4)
    assert torch.equal(a, a2) and torch.equal(b, b2) and len(a) == 40 and len(b) == 10


def test_slimming_step_is_l1_subgradient():
    net = vgg((4, 4, 4))
    with torch.no_grad():
        net[-1].weight.zero_()  # zero data gradient for everything before the classifier
        for bn in (net[1], net[5], net[9]):
            bn.weight.copy_(torch.tensor([0.5, -0.3, 0.2, -0.7]))
    names = slimmed_norms(net, torch.randn(1, 1, 16, 16))
    assert names == ["1", "5", "9"]
    before = {n: net.get_submodule(n).weight.detach().clone() for n in names}
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    lr, s = 0.1, 1e-2
    cfg = TrainConfig(epochs=1, lr=lr, momentum=0.0, weight_decay=0.0, schedule="constant", batch_size=8, progress=False)
    fit(net, (x, y), None, cfg, Hooks(after_backward=sparsity_hook(names, s)))
    for n in names:
        g0 = before[n]
        assert torch.equal(net.get_submodule(n).weight, g0.add(torch.sign(g0) * s, alpha=-lr))


def test_slimming_digits_end_to_end():
    x, y = digits((1, 1, 16, 16))
    cfg = TrainConfig(lr=0.05, batch_size=64, progress=False)
    pruned, rep = slimming(vgg(), x[:1], (x, y), sparsity=1e-4, ratio=0.5, epochs=5, finetune_epochs=5, config=cfg)
    sparse = rep["sparse_model"]
    graph = surgery.trace(sparse, x[:1])
    from surgery.roles import norm_members

    scored = []  # (|gamma|, group id, channel)
    for g in graph.prunable_groups:
        (m,) = norm_members(sparse, g)
        scored += [(float(v), g.id, i) for i, v in enumerate(sparse.get_submodule(m.module).weight.detach().abs())]
    k = int(len(scored) * 0.5)
    expected = {(gid, i) for _, gid, i in sorted(scored)[:k]}
    removed = {(g.id, i) for g in rep["plan"].groups for i in range(g.size) if i not in g.keep}
    assert removed == expected and rep["removed"] == k
    acc = rep["accuracy"]
    assert acc["sparse"] > 0.85
    assert acc["finetuned"] > acc["sparse"] - 0.1
    assert rep["params"]["after"] < 0.5 * rep["params"]["before"]
    assert evaluate(pruned, (x, y))[0] > 0.8


def run_cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "surgery.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_cli_finetune(tmp_path):
    x, y = digits((1, 1, 16, 16))
    net = vgg()
    fit(net, (x, y), None, TrainConfig(epochs=2, lr=0.05, batch_size=64, progress=False))
    pruned = surgery.prune(net, x[:1], method="l1", ratio=0.5)
    acc_pruned = evaluate(pruned, (x, y))[0]
    surgery.save(pruned, tmp_path / "pruned.pt", metadata={"input_shape": [1, 1, 16, 16]}, example_inputs=x[:1])
    from concurrent.futures import ThreadPoolExecutor

    jobs = {
        "ok": ["finetune", "pruned.pt", "--data", "digits", "--epochs", "2", "--lr", "0.02", "--out", "ft.pt"],
        "no_data": ["finetune", "pruned.pt", "--epochs", "2", "--out", "bad1.pt"],
        "bad_epochs": ["finetune", "pruned.pt", "--data", "digits", "--epochs", "0", "--out", "bad2.pt"],
        "prune_ft": ["prune", "pruned.pt", "--method", "l1", "--ratio", "0.25", "--data", "digits", "--finetune-epochs", "1",
                     "--out", "p2.pt"],
    }
    with ThreadPoolExecutor(4) as pool:
        res = dict(zip(jobs, pool.map(lambda a: run_cli(a, tmp_path), jobs.values())))
    assert res["ok"].returncode == 0, res["ok"].stderr
    assert "->" in res["ok"].stdout
    tuned = surgery.load(tmp_path / "ft.pt")
    assert evaluate(tuned, (x, y))[0] > acc_pruned + 0.05
    assert res["prune_ft"].returncode == 0 and "after 1 fine-tuning epoch(s)" in res["prune_ft"].stdout, res["prune_ft"].stderr
    assert (tmp_path / "p2.pt").exists()
    for name in ("no_data", "bad_epochs"):
        r = res[name]
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), (name, r.stderr)
    assert not any((tmp_path / f"bad{i}.pt").exists() for i in (1, 2))
