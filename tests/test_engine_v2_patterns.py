"""Patterns written out by hand, each on a tiny model: channel statistics broadcast back (RMSNorm,
L2 normalisation, ``F.normalize``, LayerNorm), rotary embeddings in attention, torch's transformer
layers traced through (leafness comes from the rule registry), weight standardisation, and fx's
immutable argument lists reaching a function that edits them (torchvision's ``swin3d_t``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import check_pruned_equals_masked  # noqa: E402

import surgery  # noqa: E402
from surgery import Reason  # noqa: E402
from surgery.dependency_graph.tracing import trace_module  # noqa: E402


def _group_of(graph, module: str, param: str, dim: int):
    found = [g for g in graph.groups if any(m.module == module and m.param == param and m.dim == dim for m in g.members)]
    assert len(found) == 1, f"{module}.{param}[dim {dim}] is in {len(found)} groups"
    return found[0]


def _modules(graph) -> list[str]:
    return [n.target for n in graph.fx_graph.nodes if n.op == "call_module"]


# ---------------------------------------------------------------------------------------------
# 1. hand-written channel statistics are cross-channel groups, not stops
# ---------------------------------------------------------------------------------------------


class Stat(nn.Module):
    """Linear(6 -> 8) on (B, L, 6), a statistic over the 8 channels, Linear(8 -> 3)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        self.weight = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        y, k = self.a(x), self.kind
        if k == "rmsnorm":
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        elif k == "layernorm":
            y = (y - y.mean(-1, keepdim=True)) / (y.std(-1, keepdim=True) + 1e-5) * self.weight
        elif k == "l2":
            y = y / y.pow(2).sum(-1, keepdim=True).sqrt()
        elif k == "l2 norm()[..., None]":
            y = y / y.norm(dim=-1)[..., None]
        elif k == "F.normalize":
            y = F.normalize(y, dim=-1)
        elif k == "softmax":
            e = (y - y.amax(-1, keepdim=True)).exp()
            y = e / e.sum(-1, keepdim=True)
        return self.b(y)


class ConvStat(nn.Module):
    """Conv(3 -> 8), an L2 normalisation over the channel dim (dim 1), Conv(8 -> 4)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        if self.kind == "conv l2":
            y = y / y.pow(2).sum(1, keepdim=True).sqrt().clamp_min(1e-6)
        else:
            y = F.normalize(y, dim=1)
        return self.b(y)


STATS = {  # kind -> (model, input, op named in the cross-channel message)
    "rmsnorm": (Stat, (2, 5, 6), "mean"),
    "layernorm": (Stat, (2, 5, 6), "std"),
    "l2": (Stat, (2, 5, 6), "sum"),
    "l2 norm()[..., None]": (Stat, (2, 5, 6), "norm"),
    "F.normalize": (Stat, (2, 5, 6), "F.normalize"),
    "softmax": (Stat, (2, 5, 6), "sum"),
    "conv l2": (ConvStat, (2, 3, 8, 8), "sum"),
    "conv F.normalize": (ConvStat, (2, 3, 8, 8), "F.normalize"),
}


@pytest.mark.parametrize("kind", list(STATS))
def test_channel_statistic_is_a_cross_channel_group(kind):
    cls, shape, op = STATS[kind]
    model, x = cls(kind).eval(), torch.randn(*shape)
    graph = surgery.trace(model, x)
    g = _group_of(graph, "a", "weight", 0)
    assert g.prunable and g.size == 8 and op in g.cross_channel, (g.why, g.cross_channel)
    assert g is _group_of(graph, "b", "weight", 1)
    # skip_cross_channel (the helper's default): nothing crossing the statistic is pruned
    plan, pruned, _ = check_pruned_equals_masked(model, x, ratio=0.5, expect_fewer_params=False)
    assert not plan.groups and pruned.a.weight.shape[0] == 8
    # pruned anyway: a smaller model that runs
    pruned = surgery.prune(model, x, method="l1", ratio=0.5, skip_cross_channel=False)
    assert pruned.a.weight.shape[0] == 4 and pruned.b.weight.shape[1] == 4
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
        assert pruned(torch.randn(3, *shape[1:])).shape[0] == 3


def test_statistic_not_broadcast_back_still_stops():
    """``y.mean(-1)`` feeding a Linear is pooling over channels (and a mean added to a tensor of
    another width is no normalisation): the reduced channels stay stopped, named by the op."""

    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(5, 3), nn.Linear(6, 4)
            self.d = nn.Linear(4, 3)

        def forward(self, x):  # x: (B, 5, 6)
            y = self.b(self.a(x).mean(-1))
            z = self.c(x)
            return y[:, None] + self.d(z) + z.mean(-1, keepdim=True)  # (B, 5, 1) into (B, 5, 3)

    model, x = Pool().eval(), torch.randn(2, 5, 6)
    graph = surgery.trace(model, x)
    for name in ("a", "c"):
        g = _group_of(graph, name, "weight", 0)
        assert not g.prunable and g.reason is Reason.FIXED_DIM and "mean" in g.reason_detail and not g.cross_channel


# ---------------------------------------------------------------------------------------------
# 2. rotary embeddings fix the head dim, never the heads
# ---------------------------------------------------------------------------------------------


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class RotaryAttention(nn.Module):
    """q/k/v/o Linears, 4 heads of 8 (head_dim larger than the head count), cos/sin tables from a
    position product (``torch.outer`` or ``t[:, None] * inv_freq[None]``) as (L, 8) or (1, 1, L, 8)."""

    def __init__(self, table: str, d: int = 32, heads: int = 4):
        super().__init__()
        self.table, self.hd = table, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, self.hd, 2).float() / self.hd), persistent=False)

    def tables(self, seq_len: int, device):
        t = torch.arange(seq_len, device=device).type_as(self.inv_freq)
        if self.table == "outer (1, 1, L, hd)":
            freqs = torch.outer(t, self.inv_freq)
        else:
            freqs = t[:, None] * self.inv_freq[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        return (cos[None, None], sin[None, None]) if self.table.endswith("(1, 1, L, hd)") else (cos, sin)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, self.hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        cos, sin = self.tables(n, x.device)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("table", ["outer (1, 1, L, hd)", "index product (L, hd)", "index product (1, 1, L, hd)"])
def test_rotary_attention_keeps_heads_prunable(table):
    model, x = RotaryAttention(table).eval(), torch.randn(2, 5, 32)
    graph = surgery.trace(model, x)
    heads = _group_of(graph, "q", "weight", 0)
    assert heads.prunable and heads.size == 4 and not heads.cross_channel
    for name in ("k", "v"):
        assert _group_of(graph, name, "weight", 0) is heads
    assert _group_of(graph, "o", "weight", 1) is heads
    rows = next(m for m in heads.members if m.module == "q" and m.param == "weight").index_map()
    assert [sorted(r) for r in rows] == [list(range(8 * h, 8 * h + 8)) for h in range(4)]  # whole heads
    plan, pruned, _ = check_pruned_equals_masked(model, x, ratio=0.5)
    assert type(pruned) is RotaryAttention
    for name in ("q", "k", "v"):
        assert tuple(getattr(pruned, name).weight.shape) == (16, 32)  # two heads of 8 left
    assert tuple(pruned.o.weight.shape) == (32, 16)
    with torch.no_grad():
        assert pruned(torch.randn(3, 7, 32)).shape == (3, 7, 32)


# ---------------------------------------------------------------------------------------------
# 3. leaves come from the registry: torch's composite modules are traced through
# ---------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self, norm_first: bool = False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.enc(x))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_transformer_encoder_is_traced_through(norm_first):
    torch.manual_seed(0)
    model, x = Encoder(norm_first).eval(), torch.randn(2, 5, 16)
    gm = trace_module(model, x)
    assert "enc.layers.0.linear1" in [n.target for n in gm.graph.nodes]
    with torch.no_grad():  # the module itself takes the fused fast path here; the graph, the Python one
        assert torch.allclose(gm(x), model(x), atol=1e-5)
    graph = surgery.trace(model, x)
    for i in range(2):
        g = _group_of(graph, f"enc.layers.{i}.linear1", "weight", 0)
        assert g.prunable and g.size == 32 and g is _group_of(graph, f"enc.layers.{i}.linear2", "weight", 1)
    plan, pruned, _ = check_pruned_equals_masked(model, x, ratio=0.5)
    assert sorted(g.label.split(" ")[0] for g in plan.groups) == ["enc.layers.0.linear1", "enc.layers.1.linear1"]
    for i in range(2):
        assert tuple(pruned.enc.layers[i].linear1.weight.shape) == (16, 16)
        assert tuple(pruned.enc.layers[i].linear2.weight.shape) == (16, 16)
    with torch.no_grad():
        assert pruned(torch.randn(3, 7, 16)).shape == (3, 7, 3)


def test_transformer_decoder_layer_and_untraceable_transformer():
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.dec = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

        def forward(self, tgt, memory):
            return self.dec(tgt, memory)

    class Full(nn.Module):  # nn.Transformer checks shapes in Python: fx cannot enter it, so it is called whole
        def __init__(self):
            super().__init__()
            self.t = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True)

        def forward(self, src, tgt):
            return self.t(src, tgt)

    xs = (torch.randn(2, 5, 16), torch.randn(2, 4, 16))
    model = Decoder().eval()
    g = _group_of(surgery.trace(model, xs), "dec.linear1", "weight", 0)
    assert g.prunable and g.size == 32
    _, pruned, _ = check_pruned_equals_masked(model, xs, ratio=0.5)
    assert tuple(pruned.dec.linear1.weight.shape) == (16, 16)
    assert _modules(surgery.trace(Full().eval(), xs)) == ["t"]


def test_leaf_iff_module_rule():
    class Custom(nn.Conv2d):  # its own forward: entered, whatever its base's rule says
        def forward(self, x):
            return F.conv2d(x, self.weight * 2, self.bias, self.stride, self.padding)

    class Plain(nn.Conv2d):  # inherits Conv2d.forward: the conv rule applies, a leaf
        pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.p = Custom(3, 4, 3), Plain(4, 4, 1)
            self.seq = nn.Sequential(nn.ReLU(), nn.Flatten())
            self.rnn = nn.LSTM(4, 6, batch_first=True)
            self.mha = nn.MultiheadAttention(6, 2, batch_first=True)

        def forward(self, x):
            y = self.seq(self.p(self.c(x))).view(x.shape[0], 4, -1).transpose(1, 2)
            y = self.rnn(y)[0]
            return self.mha(y, y, y, need_weights=False)[0]

    model, x = Net().eval(), torch.randn(2, 3, 6, 6)
    assert _modules(surgery.trace(model, x)) == ["p", "seq.0", "seq.1", "rnn", "mha"]
    assert _modules(surgery.trace(model, x, leaf_modules=["seq"])) == ["p", "seq", "rnn", "mha"]


# ---------------------------------------------------------------------------------------------
# 4. weight standardisation: output channels exact, input channels cross-channel
# ---------------------------------------------------------------------------------------------


class StdConv2d(nn.Conv2d):
    """A conv that standardises each filter over its own weights (NF-nets, BiT) before convolving."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _timm_std_conv():
    timm_layers = pytest.importorskip("timm.layers", reason="timm is not installed")
    return timm_layers.StdConv2d


@pytest.mark.parametrize("which", ["in-test StdConv2d", "timm StdConv2d"])
def test_weight_standardisation(which):
    conv = StdConv2d if which == "in-test StdConv2d" else _timm_std_conv()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), conv(8, 6, 3, padding=1), nn.Conv2d(6, 4, 1)

        def forward(self, x):
            return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    graph = surgery.trace(model, x)
    assert "c2" not in _modules(graph)  # its own forward is traced
    out = _group_of(graph, "c2", "weight", 0)
    assert out.prunable and not out.cross_channel and out is _group_of(graph, "c3", "weight", 1)
    inputs = _group_of(graph, "c2", "weight", 1)
    assert inputs is _group_of(graph, "c1", "weight", 0) and inputs.prunable and inputs.cross_channel
    plan, pruned, _ = check_pruned_equals_masked(model, x, ratio=0.5)
    assert [g.label.split(" ")[0] for g in plan.groups] == ["c2"]  # output channels only, exactly
    assert tuple(pruned.c2.weight.shape) == (3, 8, 3, 3) and tuple(pruned.c3.weight.shape) == (4, 3, 1, 1)
    with torch.no_grad():
        assert pruned(torch.randn(1, 3, 8, 8)).shape == (1, 4, 8, 8)


# ---------------------------------------------------------------------------------------------
# 5. fx's immutable argument lists never reach a function that edits them
# ---------------------------------------------------------------------------------------------


def fit_window(window: list[int], size: list[int]) -> list[int]:
    """Shrinks the window to the input in place, as torchvision's Swin 3D helper does."""
    for i in range(len(window)):
        if size[i] < window[i]:
            window[i] = size[i]
    return window


torch.fx.wrap("fit_window")


def test_function_that_mutates_its_list_arguments():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(F.avg_pool2d(y, fit_window([4, 4], [y.shape[2], y.shape[3]])))

    model, x = Net().eval(), torch.randn(1, 3, 3, 3)
    graph = surgery.trace(model, x)
    call = next(n for n in graph.fx_graph.nodes if n.target is fit_window)
    assert call.args[0] == [4, 4] and call.meta["val"] == [3, 3]  # the graph's own list is untouched
    assert _group_of(graph, "a", "weight", 0).prunable
    _, pruned, _ = check_pruned_equals_masked(model, x, ratio=0.5)
    assert tuple(pruned.a.weight.shape) == (4, 3, 3, 3)


def test_swin3d_t_prunes_exactly():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model, x = torchvision.models.video.swin3d_t().eval(), torch.randn(1, 3, 4, 32, 32)
    plan, pruned, _ = check_pruned_equals_masked(model, x, ratio=0.5)
    assert len(plan.groups) >= 12  # every block's MLP
    assert pruned.features[0][0].mlp[0].out_features == model.features[0][0].mlp[0].out_features // 2
