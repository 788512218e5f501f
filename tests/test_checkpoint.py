"""Dense/CSR checkpoints: exact round trips, no source or pickle needed, allow-list, atomic writes."""

from __future__ import annotations

import json
import operator
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import surgery
from surgery import checkpoint
from surgery.errors import ModelLoadError, SurgeryError

X64 = torch.randn(1, 3, 64, 64)
SURGERY_DIR = str(Path(surgery.__file__).parent)


@pytest.fixture(scope="module")
def pruned_resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    return surgery.prune(model, X64, method="l1", ratio=0.5, output="graph")


def assert_same_model(a: nn.Module, b: nn.Module, *inputs) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        ya, yb = a(*inputs), b(*inputs)
    for u, v in zip(ya if isinstance(ya, tuple) else (ya,), yb if isinstance(yb, tuple) else (yb,)):
        assert torch.equal(u, v)


def test_pruned_resnet_round_trip(pruned_resnet, tmp_path):
    meta = {"source": "torchvision:resnet18", "method": "l1", "plan": pruned_resnet.meta["surgery_plan"]}
    checkpoint.save(pruned_resnet, tmp_path / "r.pt", metadata=meta)
    back = checkpoint.load(tmp_path / "r.pt")
    assert isinstance(back, torch.fx.GraphModule) and not back.training
    assert_same_model(pruned_resnet, back, X64)
    assert checkpoint.read_metadata(tmp_path / "r.pt")["method"] == "l1"
    assert back.meta["surgery"]["source"] == "torchvision:resnet18"
    assert back.meta["surgery_plan"]["method"] == "l1"
    assert sum(p.numel() for p in back.parameters()) < 11_689_512 / 2
    surgery.trace(back, X64)  # a loaded checkpoint is itself a traceable model


def test_csr_format_is_exact_and_small_for_sparse_weights(tmp_path):
    net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4)).eval()
    with torch.no_grad():
        net[0].weight.mul_((torch.rand_like(net[0].weight) < 0.05).float())
    checkpoint.save(net, tmp_path / "dense.pt")
    checkpoint.save(net, tmp_path / "csr.pt", format="csr")
    assert os.path.getsize(tmp_path / "csr.pt") < os.path.getsize(tmp_path / "dense.pt") / 2
    assert_same_model(net, checkpoint.load(tmp_path / "csr.pt"), torch.randn(2, 256))


class Features(nn.Module):
    """Graph features a rewrite can produce: getattr/size/view, slices, cat, functional calls, kwargs,
    a tensor constant, tied weights, a shared module, non-persistent buffers, leaf MHA and LSTM."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding="same", bias=False)
        self.norm = nn.GroupNorm(2, 8)
        self.act = nn.Hardswish()
        self.scale = torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1)  # plain tensor attribute -> get_attr
        self.register_buffer("shift", torch.randn(8), persistent=False)
        self.proj = nn.Linear(8, 8)
        self.proj2 = nn.Linear(8, 8)
        self.proj2.weight = self.proj.weight  # tied
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.rnn = nn.LSTM(8, 4, batch_first=True)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        y = self.act(self.norm(self.conv(x))) * self.scale
        y = y + self.shift.view(1, -1, 1, 1)
        b = y.shape[0]
        seq = y.flatten(2).transpose(1, 2)  # b, hw, c
        seq = torch.cat([seq[:, :4], seq[..., 4:8, :]], dim=1)
        a, _ = self.attn(seq, seq, seq, need_weights=False)
        h = self.proj2(F.gelu(self.proj(a), approximate="tanh"))
        out, (hn, _) = self.rnn(self.drop(h))
        return operator.add(out.reshape(b, -1), hn.permute(1, 0, 2).reshape(b, -1).sum(-1, keepdim=True)), y.amax(dim=(2, 3))


def test_graph_features_round_trip(tmp_path):
    net = Features().eval()
    x = torch.randn(2, 3, 6, 6)
    traced = torch.fx.GraphModule(net, surgery.dependency_graph.tracing._Tracer((nn.MultiheadAttention, nn.RNNBase), frozenset()).trace(net))
    traced.register_buffer("unused", torch.ones(2), persistent=False)
    checkpoint.save(traced, tmp_path / "f.pt")
    back = checkpoint.load(tmp_path / "f.pt")
    assert back.proj.weight is back.proj2.weight
    assert "unused" not in back.state_dict() and torch.equal(back.unused, traced.unused)
    assert_same_model(traced, back, x)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(net(x), back(x)))
    assert back.code == traced.code.replace(" : torch.Tensor", "").replace(" -> torch.Tensor", "")


def test_plain_module_is_traced_and_checked_with_inputs(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    checkpoint.save(net, tmp_path / "n.safetensors", example_inputs=torch.randn(1, 3, 8, 8))
    assert_same_model(net, checkpoint.load(tmp_path / "n.safetensors"), torch.randn(1, 3, 8, 8))


class Custom(nn.Module):
    def forward(self, x):
        return x * 2


def test_modules_off_the_allow_list_are_not_saved(tmp_path):
    gm = torch.fx.GraphModule(nn.ModuleDict({"c": Custom()}), _call_graph("c"))
    with pytest.raises(SurgeryError, match=r"module 'c' of class .*Custom.*torch\.nn"):
        checkpoint.save(gm, tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


def _call_graph(target: str) -> torch.fx.Graph:
    g = torch.fx.Graph()
    g.output(g.call_module(target, (g.placeholder("x"),)))
    return g


def forge(src: Path, dst: Path, edit) -> None:
    """Copy checkpoint ``src`` to ``dst`` with ``edit(spec)`` applied to its model description."""
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    spec = json.loads(meta["model"])
    edit(spec)
    meta["model"] = json.dumps(spec)
    meta["checksum"] = checkpoint.checksum(meta, load_file(str(src)))  # a forger recomputes it
    save_file(load_file(str(src)), str(dst), metadata=meta)


_INJECT = 'w", None) or print("injected") or ("'


def _set_class(spec, name):
    next(m for m in spec["modules"] if m.get("class"))["class"] = name


def _set_target(spec, op, target, args=None):
    node = next(n for n in spec["graph"]["nodes"] if n["op"] == op)
    node["target"] = target
    if args is not None:
        node["args"] = args


@pytest.mark.parametrize("edit, pattern", [
    (lambda s: _set_class(s, "subprocess.Popen"), "module class 'subprocess.Popen'.*allow-list"),
    (lambda s: _set_class(s, "torch.fx.graph_module.GraphModule"), "sub-graph .* is malformed"),  # the class without a graph
    (lambda s: _set_target(s, "call_function", "posix.system"), "calls 'posix.system'.*allow-list"),
    (lambda s: _set_target(s, "call_function", "torch.load"), "calls 'torch.load'"),
    (lambda s: _set_target(s, "call_function", "builtins.eval"), "allow-list"),
    (lambda s: _set_target(s, "call_function", "getattr", {"$tuple": [{"$node": "x"}, "__class__"]}), "attribute '__class__'"),
    (lambda s: _set_target(s, "call_module", "no.such.module"), "unknown module"),
    (lambda s: s["graph"]["nodes"][1].update(op="call_method", target="__reduce__"), "method '__reduce__'"),
    (lambda s: s["graph"]["nodes"][1].update(op="get_attr", target="training"), "not a stored tensor"),
    (lambda s: s["modules"][1]["attrs"].update(forward="x"), None),
    (lambda s: s["modules"][1]["attrs"].update(_parameters=1), "forbidden attribute"),
    (lambda s: s["graph"]["nodes"][1]["args"].update({"$tuple": [{"$node": "later"}]}), "unknown node"),
    # names fx writes into generated code unescaped: a quote would inject code
    (lambda s: s["modules"][1]["params"].update({_INJECT: s["modules"][1]["params"].pop("weight")}), "not an attribute name"),
    (lambda s: s["modules"][1].update(path=_INJECT), "not an attribute path"),
    (lambda s: _set_target(s, "call_module", _INJECT), "not an attribute path"),
    (lambda s: s["graph"]["nodes"][2].update(kwargs={"$dict": {_INJECT: 1}}), "keyword argument name"),
    (lambda s: s["graph"]["nodes"][0].update(target='x=print("injected")'), "input named .* not an identifier"),
    # a module handed to functions, or the higher-order op without a stored sub-graph
    (lambda s: s["graph"]["nodes"][1].update(op="get_attr", target="0", args={"$tuple": []}), "not a stored tensor or sub-graph"),
    (lambda s: _set_target(s, "call_function", "torch.ops.higher_order.wrap_with_set_grad_enabled",
                           {"$tuple": [False, {"$node": s["graph"]["nodes"][1]["name"]}, {"$node": "x"}]}),
     "without a stored sub-graph"),
])
def test_forged_checkpoints_are_refused(tmp_path, edit, pattern):
    net = nn.Sequential(nn.Linear(4, 4))
    g = torch.fx.Graph()  # x -> call_module 0 -> call_function relu -> output
    x = g.placeholder("x")
    y = g.call_module("0", (x,))
    g.output(g.call_function(torch.relu, (y,)))
    checkpoint.save(torch.fx.GraphModule(net, g), tmp_path / "ok.pt")
    forge(tmp_path / "ok.pt", tmp_path / "bad.pt", edit)
    if pattern is None:  # data attributes shadowing methods are harmless: the call just fails
        back = checkpoint.load(tmp_path / "bad.pt")
        with pytest.raises(TypeError):
            back(torch.randn(1, 4))
        return
    with pytest.raises(ModelLoadError, match=pattern) as exc:
        checkpoint.load(tmp_path / "bad.pt")
    assert "\n" not in str(exc.value)


class _NoGradTable(nn.Module):
    """A part computed under ``torch.no_grad()`` (as rotary tables are): ``torch.export`` puts it in a
    ``wrap_with_set_grad_enabled`` sub-graph."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("freq", torch.arange(4.0))

    def forward(self, x):
        with torch.no_grad():
            table = torch.cos(x * self.freq)
        return self.lin(x) + table


def test_export_sub_graphs_are_stored_and_checked(tmp_path):
    from surgery.dependency_graph.exporting import export_module

    torch.manual_seed(0)
    model = _NoGradTable().eval()
    x = torch.randn(3, 4)
    gm = export_module(model, (x,))
    subs = [n for n, m in gm.named_children() if isinstance(m, torch.fx.GraphModule)]
    assert subs and any(n.target is torch.ops.higher_order.wrap_with_set_grad_enabled for n in gm.graph.nodes)
    checkpoint.save(gm, tmp_path / "sub.pt")
    back = checkpoint.load(tmp_path / "sub.pt")
    assert isinstance(getattr(back, subs[0]), torch.fx.GraphModule)
    assert torch.equal(back(x), model(x))
    # the sub-graph's own nodes are checked like the root's
    def edit(spec):
        entry = next(e for e in spec["modules"] if e.get("graph"))
        next(n for n in entry["graph"]["nodes"] if n["op"] == "call_function")["target"] = "posix.system"
    forge(tmp_path / "sub.pt", tmp_path / "bad.pt", edit)
    with pytest.raises(ModelLoadError, match="calls 'posix.system'.*allow-list"):
        checkpoint.load(tmp_path / "bad.pt")


def test_bad_files(tmp_path, pruned_resnet):
    checkpoint.save(pruned_resnet, tmp_path / "r.pt")
    data = (tmp_path / "r.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("hello\n")
    for name, pattern in [("trunc.pt", "truncated or corrupt"), ("text.pt", "not a surgery checkpoint"),
                          ("missing.pt", "no such file")]:
        with pytest.raises(ModelLoadError, match=pattern):
            checkpoint.load(tmp_path / name)
    with pytest.raises(ModelLoadError, match="not a surgery checkpoint"):
        checkpoint.read_metadata(tmp_path / "text.pt")


def test_bad_arguments_write_nothing(tmp_path):
    net = nn.Linear(2, 2)
    with pytest.raises(SurgeryError, match="unknown checkpoint format 'zip'"):
        checkpoint.save(net, tmp_path / "a.pt", format="zip")
    with pytest.raises(SurgeryError, match="not JSON-serialisable"):
        checkpoint.save(net, tmp_path / "b.pt", metadata={"x": object()})
    with pytest.raises(SurgeryError, match="does not exist"):
        checkpoint.save(net, tmp_path / "nodir" / "c.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_interrupted_save_leaves_old_file_and_no_temp(tmp_path, monkeypatch, exc):
    import safetensors.torch

    target = tmp_path / "m.pt"
    target.write_bytes(b"old content")

    def broken(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise exc(28, "No space left on device") if exc is OSError else exc()

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(SurgeryError if exc is OSError else KeyboardInterrupt):
        checkpoint.save(nn.Linear(2, 2), target)
    assert target.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


BLOCKED = textwrap.dedent("""
    import importlib.abc, sys, types

    class NoTorchvision(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torchvision" or name.startswith("torchvision."):
                raise ImportError("torchvision is blocked in this test")
            return None

    sys.meta_path.insert(0, NoTorchvision())
    import torch
    from safetensors.torch import load_file
    if {stub}:  # import surgery.checkpoint without running surgery/__init__ (which imports the graph rules)
        pkg = types.ModuleType("surgery")
        pkg.__path__ = [{surgery_dir!r}]
        sys.modules["surgery"] = pkg
    from surgery import checkpoint
    model = checkpoint.load({path!r})
    io = load_file({io!r})
    with torch.no_grad():
        assert torch.equal(model(io["x"]), io["y"])
    assert not [m for m in sys.modules if m.startswith("torchvision")]
    print("ran without torchvision")
""")


def _run_blocked(tmp_path, pruned_resnet, stub: bool) -> subprocess.CompletedProcess:
    checkpoint.save(pruned_resnet, tmp_path / "r.pt")
    with torch.no_grad():
        save_file({"x": X64, "y": pruned_resnet(X64)}, str(tmp_path / "io.safetensors"))
    script = BLOCKED.format(stub=stub, surgery_dir=SURGERY_DIR, path=str(tmp_path / "r.pt"), io=str(tmp_path / "io.safetensors"))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_loads_and_runs_without_torchvision(tmp_path, pruned_resnet):
    r = _run_blocked(tmp_path, pruned_resnet, stub=True)
    assert r.returncode == 0 and "ran without torchvision" in r.stdout, r.stderr


def test_package_import_without_torchvision(tmp_path, pruned_resnet):
    r = _run_blocked(tmp_path, pruned_resnet, stub=False)
    assert r.returncode == 0, r.stderr.strip().splitlines()[-1]


def test_bitwise_aten_dunder_ops_are_storable(tmp_path):
    # exported transformers build their attention masks with aten.__and__ (and __or__ / __xor__)
    aten = torch.ops.aten

    class Masked(nn.Module):
        def forward(self, x):
            a, b = x > 0, x < 1
            both = aten.__and__.Tensor(a, b)
            return torch.where(both, x, x * 2) + aten.__or__.Tensor(a, b).float() + aten.__xor__.Tensor(a, b).float()

    x = torch.randn(2, 5)
    gm = torch.fx.symbolic_trace(Masked())
    surgery.save(gm, tmp_path / "m.pt", example_inputs=(x,))
    back = surgery.load(tmp_path / "m.pt")
    assert {str(n.target) for n in back.graph.nodes} >= {"aten.__and__.Tensor", "aten.__or__.Tensor"}
    assert torch.equal(back(x), Masked()(x))
