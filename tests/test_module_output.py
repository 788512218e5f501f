"""The pruned model is still the user's model: same class, new widths, runs at other shapes, trains
its BatchNorm, saves; a forward that holds a width as a literal falls back to the GraphModule with
the reason."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torchvision
from torch import nn

import surgery
from helpers import assert_same_state, rel_err, state_snapshot
from surgery.errors import RewriteError


class Block(nn.Module):
    """A custom block class with its own attribute that is not a width."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c)
        self.conv2, self.bn2 = nn.Conv2d(2 * c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.tag = "custom"

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))

    def describe(self) -> str:  # a user's method survives
        return f"{len(self.blocks)} blocks"


class Literal(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.c(x)).view(-1, 128))  # 128 = 8 channels x 4 x 4, held as a literal


def _randomise_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)


@pytest.mark.parametrize("make", [lambda: torchvision.models.resnet18(), lambda: torchvision.models.mobilenet_v3_small(), Custom])
def test_module_output_is_the_users_class_and_equals_the_masked_model(make):
    model = make().eval()
    _randomise_bn(model)
    x = torch.randn(1, 3, 64, 64)
    before = state_snapshot(model)
    res = surgery.pipeline.run(model, x, "l1", 0.5)
    pruned = res.model
    assert type(pruned) is type(model) and pruned is not model
    masked = surgery.apply(model, res.plan, mode="mask")
    assert type(masked) is type(model)
    with torch.no_grad():
        assert rel_err(pruned(x), masked(x)) < 1e-4
        big = torch.randn(2, 3, 80, 96)  # another batch size and resolution
        assert rel_err(pruned(big), masked(big)) < 1e-4
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert_same_state(model, before)
    if isinstance(model, Custom):
        assert pruned.describe() == "2 blocks" and pruned.blocks[0].tag == "custom"
        assert pruned.blocks[0].conv1.out_channels == 8 and pruned.blocks[0].bn1.num_features == 8


def test_module_output_trains_its_batchnorm_and_saves(tmp_path):
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    pruned = surgery.prune(model, x, "l1", 0.5)
    bn = pruned.layer1[0].bn1
    stats = bn.running_mean.clone()
    pruned.train()
    opt = torch.optim.SGD(pruned.parameters(), lr=0.01)
    for _ in range(2):
        loss = pruned(torch.randn(4, 3, 64, 64)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(bn.running_mean, stats)
    pruned.eval()
    buf = io.BytesIO()
    torch.save(pruned, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    surgery.save(pruned, tmp_path / "p.pt", example_inputs=x)
    loaded = surgery.load(tmp_path / "p.pt")
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x)) and torch.equal(loaded(x), pruned(x))


def test_literal_width_in_forward_falls_back_to_the_graph_with_the_reason():
    model, x = Literal().eval(), torch.randn(1, 3, 4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = surgery.prune(model, x, "l1", 0.5)
    assert isinstance(pruned, torch.fx.GraphModule)
    why = pruned.meta["surgery_output"]["reason"]
    assert "the model's own forward fails on the pruned widths" in why and "[-1, 128]" in why
    assert any("surgery returns a GraphModule" in str(w.message) for w in caught)
    with torch.no_grad():
        assert pruned(x).shape == (1, 5)
    with pytest.raises(RewriteError, match=r"cannot return the model's own class: the model's own forward fails"):
        surgery.prune(model, x, "l1", 0.5, output="module")
    assert isinstance(surgery.prune(model, x, "l1", 0.5, output="graph"), torch.fx.GraphModule)


def test_unknown_output_is_an_error():
    with pytest.raises(surgery.SurgeryError, match="unknown output 'tree'; known outputs: auto, module, graph"):
        surgery.prune(Custom().eval(), torch.randn(1, 3, 8, 8), output="tree")


class Sinusoid(nn.Module):
    """A tensor made in forward (fx records it as a numbered constant) and a literal width: the
    result is a GraphModule."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, t):
        freqs = torch.exp(-torch.arange(4, dtype=torch.float32))
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([args.sin(), args.cos()], -1)
        return self.b(torch.relu(self.a(emb)).view(-1, 16))


def test_plans_replay_on_traces_with_numbered_constants_and_graph_results_pickle():
    model, t = Sinusoid().eval(), torch.tensor([3, 5])
    res = surgery.pipeline.run(model, t, "l1", 0.5, output="graph")
    again = surgery.apply(model, res.plan, output="graph")  # a second trace numbers its constant anew
    buf = io.BytesIO()
    torch.save(again, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(back(t), res.model(t)) and torch.equal(again(t), res.model(t))
