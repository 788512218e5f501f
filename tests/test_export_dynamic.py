"""Graphs from the torch.export front end are usable after pruning: any batch size (and spatial /
sequence length where the model allows), BatchNorm and dropout follow train()/eval(), and they save
with surgery.save and torch.save."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

import surgery
from helpers import assert_same_state, check_pruned_equals_masked, n_params, rel_err, state_snapshot
from surgery import _allowlist
from surgery.dependency_graph.tracing import _symbolic_trace
from surgery.errors import TraceError
from test_export_frontend import ShapeBranch


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


class GapNet(nn.Module):
    """Python asserts on the input's shape (fx cannot trace them) in front of a shape-generic net."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x, **unused):
        assert x.dim() == 4 and x.shape[1] == 3, "expects images"
        y = self.drop(torch.relu(self.bn1(self.c1(x))))
        y = torch.relu(self.bn2(self.c2(y)))
        return self.fc(y.mean((2, 3)).view(y.size(0), -1))


class TokenNet(nn.Module):
    """Token ids (batch, length): heads reshaped with the run-time batch and length, dict output."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, t):
        if t.dim() != 2:
            raise ValueError("expects (batch, length) token ids")
        h = self.emb(t)
        b, n, _ = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        h = h + self.proj(a.transpose(1, 2).reshape(b, n, 16))
        return {"logits": self.head(h.mean(1)), "hidden": (h,)}


class BatchBranch(nn.Module):
    """Control flow on the batch size: only the example's shape can be traced."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.c(x)))
        if y.shape[0] == 1:
            y = y * 2
        return self.fc(y.flatten(1))


class WidthBranch(nn.Module):
    """Control flow on one spatial size, then global pooling: the graph holds for widths > 4 only."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.wide = nn.Conv2d(8, 6, 3, padding=1)
        self.narrow = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        y = torch.relu(self.bn(self.c(x)))
        y = self.wide(y) if y.shape[-1] > 4 else self.narrow(y)
        return self.fc(y.mean((2, 3)))


class Nested(nn.Module):
    """A tuple argument: the graph keeps export's pytree input handling."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x, extra):
        if x.shape[1] != 3:
            raise ValueError("expects RGB")
        scale, shift = extra
        return self.c2(torch.relu(self.bn(self.c(x)))) * scale + shift


def _outputs(y) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(y) if isinstance(t, torch.Tensor)]


def _assert_equal_outputs(a, b, tol: float = 1e-5) -> None:
    for u, v in zip(_outputs(a), _outputs(b), strict=True):
        assert u.shape == v.shape and rel_err(u, v) <= tol


def _prune(model, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the model is fully dynamic
        return check_pruned_equals_masked(model, x, "l1", 0.5, output="graph", **kw)


@pytest.fixture(scope="module")
def gapnet():
    torch.manual_seed(0)
    model = _randomize_bn(GapNet())
    _, pruned, masked = _prune(model, torch.randn(1, 3, 8, 8))
    return model, pruned, masked


def test_fx_cannot_trace_these_models():
    for model in (GapNet(), TokenNet(), BatchBranch(), WidthBranch(), Nested()):
        with pytest.raises(TraceError):
            _symbolic_trace(model, ())


def test_batch_and_spatial_dims_are_dynamic(gapnet):
    model, pruned, masked = gapnet
    graph = surgery.trace(model, torch.randn(1, 3, 8, 8))
    assert graph.frontend == "export"
    for node in graph.fx_graph.nodes:  # rules see concrete sizes only
        for leaf in pytree.tree_leaves(node.meta.get("val")):
            assert not isinstance(leaf, torch.SymInt)
            assert not isinstance(leaf, torch.Tensor) or all(type(s) is int for s in leaf.shape)
    assert n_params(pruned) < n_params(model)
    for shape in [(2, 3, 8, 8), (3, 3, 12, 10), (1, 3, 5, 7)]:
        x = torch.randn(shape)
        with torch.no_grad():
            y, yp, ym = model(x), pruned(x), masked(x)
        assert yp.shape == y.shape == (shape[0], 5)
        assert rel_err(yp, ym) < 1e-4


def test_sequence_length_is_dynamic():
    torch.manual_seed(0)
    model = TokenNet().eval()
    plan, pruned, masked = _prune(model, torch.randint(0, 20, (2, 7)))
    assert plan.groups
    assert pruned.graph._codegen.__class__ is torch.fx.graph.CodeGen  # dict output, plain code
    for shape in [(3, 11), (1, 4)]:
        t = torch.randint(0, 20, shape)
        with torch.no_grad():
            _assert_equal_outputs(pruned(t), masked(t), 1e-4)
            assert pruned(t)["hidden"][0].shape == (*shape, 16)


def test_shape_control_flow_keeps_spatial_dims_static_and_batch_dynamic():
    torch.manual_seed(0)
    model = _randomize_bn(ShapeBranch())
    with pytest.warns(UserWarning, match=r"dynamic in the batch only \(.*the model needs .*== 384"):
        _, pruned, masked = check_pruned_equals_masked(model, torch.randn(1, 3, 8, 8), output="graph")
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(pruned(x), masked(x)) < 1e-4
    with pytest.raises(AssertionError, match=r"x.shape\[2\] must be 8"):
        pruned(torch.randn(1, 3, 10, 10))  # the graph took the branch for widths > 4 only


def test_control_flow_on_one_size_becomes_a_range_check():
    torch.manual_seed(0)
    model = _randomize_bn(WidthBranch())
    _, pruned, masked = _prune(model, torch.randn(1, 3, 8, 8))
    x = torch.randn(2, 3, 5, 13)
    with torch.no_grad():
        assert rel_err(pruned(x), masked(x)) < 1e-4 and rel_err(masked(x), model(x)) > 0
    with pytest.raises(AssertionError, match=r"x.shape\[3\] >= 5"):
        pruned(torch.randn(2, 3, 8, 4))  # the model would take the other branch here


def test_fallback_to_static_warns_and_prunes_exactly():
    torch.manual_seed(0)
    model = _randomize_bn(BatchBranch())
    with pytest.warns(UserWarning, match="fixed to the example's shapes"):
        _, pruned, _ = check_pruned_equals_masked(model, torch.randn(1, 3, 4, 4), output="graph")
    with pytest.raises(AssertionError, match=r"x.shape\[0\] must be 1"):
        pruned(torch.randn(2, 3, 4, 4))


def test_train_mode_updates_batch_norm_and_enables_dropout(gapnet):
    model, pruned, _ = gapnet
    before = state_snapshot(model)
    net = copy.deepcopy(pruned)
    assert isinstance(net.bn1, nn.BatchNorm2d) and isinstance(net.drop, nn.Dropout)
    net.train()
    assert net.bn1.training and net.drop.training
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(1)
    assert not torch.equal(net(x), net(x))  # dropout is active
    stats = [t.clone() for t in (net.bn1.running_mean, net.bn1.running_var, net.bn2.running_mean)]
    tracked = int(net.bn1.num_batches_tracked)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(3):
        loss = nn.functional.cross_entropy(net(torch.randn(6, 3, 8, 8)), torch.tensor([0, 1, 2, 3, 4, 0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert int(net.bn1.num_batches_tracked) == tracked + 3
    for old, new in zip(stats, (net.bn1.running_mean, net.bn1.running_var, net.bn2.running_mean)):
        assert not torch.allclose(old, new)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))  # eval: running statistics, no dropout
        a, b = net(x[:1]), net(x)[:1]
    assert rel_err(a, b) < 1e-5  # eval mode: a sample does not depend on its batch
    assert_same_state(model, before)


def test_dense_checkpoint_round_trip(gapnet, tmp_path):
    _, pruned, _ = gapnet
    surgery.save(pruned, tmp_path / "g.pt", metadata={"method": "l1"})
    back = surgery.load(tmp_path / "g.pt")
    for shape in [(1, 3, 8, 8), (4, 3, 6, 10)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert torch.equal(back(x), pruned(x))
    assert isinstance(back.bn1, nn.BatchNorm2d) and not back.training
    assert surgery.trace(back, torch.randn(2, 3, 8, 8)).frontend == "fx"  # a loaded graph traces again
    back.train()
    assert back.bn1.training and back.drop.training

    torch.manual_seed(0)
    model = _randomize_bn(ShapeBranch())
    with pytest.warns(UserWarning, match="batch only"):
        branch = surgery.prune(model, torch.randn(1, 3, 8, 8), method="l1", ratio=0.5, output="graph")
    surgery.save(branch, tmp_path / "b.pt")
    back = surgery.load(tmp_path / "b.pt")
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(back(x), branch(x))
    with pytest.raises(AssertionError, match="must be 8"):
        back(torch.randn(1, 3, 9, 9))  # the input checks are graph nodes: they are saved too


def test_torch_save_round_trip(gapnet, tmp_path):
    _, pruned, _ = gapnet
    torch.save(pruned, tmp_path / "g.pth")
    back = torch.load(tmp_path / "g.pth", weights_only=False)
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(back(x), pruned(x))
    back.train()
    assert back.bn1.training


def test_nested_inputs_keep_pytree_handling_and_save(tmp_path):
    torch.manual_seed(0)
    model = _randomize_bn(Nested())
    inputs = (torch.randn(1, 3, 6, 6), (torch.randn(1, 4, 1, 1), torch.randn(1)))
    _, pruned, masked = _prune(model, inputs)
    assert type(pruned.graph._codegen) is torch.fx.graph._PyTreeCodeGen
    other = (torch.randn(3, 3, 5, 9), (torch.randn(3, 4, 1, 1), torch.randn(1)))
    with torch.no_grad():
        assert rel_err(pruned(*other), masked(*other)) < 1e-4
    surgery.save(pruned, tmp_path / "n.pt")
    back = surgery.load(tmp_path / "n.pt")
    buf = io.BytesIO()
    torch.save(pruned, buf)
    buf.seek(0)
    pickled = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(back(*other), pruned(*other)) and torch.equal(pickled(*other), pruned(*other))


def test_token_model_round_trips(tmp_path):
    torch.manual_seed(0)
    model = TokenNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruned = surgery.prune(model, torch.randint(0, 20, (2, 7)), method="l1", ratio=0.5, output="graph")
    surgery.save(pruned, tmp_path / "t.pt")
    back = surgery.load(tmp_path / "t.pt")
    t = torch.randint(0, 20, (4, 9))
    with torch.no_grad():
        _assert_equal_outputs(back(t), pruned(t), 0.0)
        assert back(t).keys() == {"logits", "hidden"}


def test_allow_list_takes_export_ops_only():
    assert _allowlist._function_allowed("torch.ops.aten._to_copy.default") is torch.ops.aten._to_copy.default
    assert _allowlist._function_allowed("torch.ops.aten.sym_size.int") is torch.ops.aten.sym_size.int
    assert _allowlist._function_allowed("torch.sym_max") is torch.sym_max
    for name in ("torch.ops.aten._unsafe_index.Tensor", "torch.ops.aten._to_copy._x", "torch.sym_foo", "torch.ops.aten._foo.default"):
        assert _allowlist._function_allowed(name) is None
    assert _allowlist.function_name(torch.ops.aten.conv2d.default) == "torch.ops.aten.conv2d.default"


def test_export_only_model_saves_from_example_inputs(tmp_path):
    torch.manual_seed(0)
    model = _randomize_bn(GapNet())
    surgery.save(model, tmp_path / "m.pt", example_inputs=torch.randn(1, 3, 8, 8))
    back = surgery.load(tmp_path / "m.pt")
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def _forge(path, edit):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    spec = json.loads(meta["model"])
    edit(spec["graph"]["pytree"])
    meta["model"] = json.dumps(spec)
    meta["checksum"] = surgery.checkpoint.checksum(meta, load_file(str(path)))  # a forger recomputes it
    save_file(load_file(str(path)), str(path), metadata=meta)


@pytest.mark.parametrize("edit, pattern", [
    (lambda p: p["orig_args"].__setitem__(0, "x):\n    import os  #"), "malformed"),
    (lambda p: p.update(in_spec=p["in_spec"].replace("builtins.tuple", "os.system", 1)), "cannot be read"),
    (lambda p: p.update(in_spec='[1, {"type": "builtins.tuple", "context": "null", "children_spec": [{"type": '
                        '"builtins.tuple", "context": "null", "children_spec": []}, {"type": "builtins.dict", '
                        '"context": "[\\"a\'] + exec(\'1\') + [\'\\"]", "children_spec": [{"type": null, "context": '
                        'null, "children_spec": []}]}]}]'), "not identifiers"),
])
def test_forged_input_structures_are_refused(tmp_path, edit, pattern):
    from surgery.errors import ModelLoadError

    model = _randomize_bn(Nested())
    inputs = (torch.randn(1, 3, 6, 6), (torch.randn(1, 4, 1, 1), torch.randn(1)))
    surgery.save(model, tmp_path / "n.pt", example_inputs=inputs)
    assert torch.equal(surgery.load(tmp_path / "n.pt")(*inputs), model(*inputs))
    _forge(tmp_path / "n.pt", edit)
    with pytest.raises(ModelLoadError, match=pattern):
        surgery.load(tmp_path / "n.pt")
