"""Ops the export front end used to stop (issue 7, items 6-7): each now has a rule, shared with the
torch function it comes from, and the group it blocked prunes with pruned == masked.

Every model takes an ``export`` flag: with it, ``forward`` branches on a shape (fx cannot trace that,
so ``torch.export`` takes over); without it, the same model goes through fx. Expected shapes are for
``group-l1`` at ratio 0.5 (``int(0.5 * n)`` channels removed per group).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import check_pruned_equals_masked  # noqa: E402

import surgery  # noqa: E402
from surgery.dependency_graph import tracing  # noqa: E402
from surgery.errors import TraceError  # noqa: E402
from surgery.pipeline import run  # noqa: E402

aten = torch.ops.aten
FRONT_ENDS = pytest.mark.parametrize("export", [True, False], ids=["export", "fx"])


class Base(nn.Module):
    def __init__(self, export: bool):
        super().__init__()
        self.export = export

    def branch(self, y):
        if self.export and y.shape[-1] > 1:  # Python control flow on a shape: fx cannot trace it
            y = y * 1.0
        return y


def _targets(graph) -> set[str]:
    return {str(n.target) for n in graph.fx_graph.nodes if n.op == "call_function"}


def _check(model, x, shapes: dict[str, tuple], ops=(), **options):
    """Traced by the expected front end, the ``ops`` in its graph, every group with a parameter in
    ``shapes`` prunable, pruned == masked, and the pruned tensors of exactly these shapes."""
    graph = surgery.trace(model, x)
    assert graph.frontend == ("export" if model.export else "fx")
    assert set(ops) <= _targets(graph), sorted(_targets(graph))
    _, pruned, _ = check_pruned_equals_masked(model, x, "group-l1", 0.5, output="graph", **options)
    got = {k: tuple(v.shape) for k, v in pruned.state_dict().items() if k in shapes}
    assert got == shapes
    return graph, pruned


# -- upsampling ---------------------------------------------------------------------------------


class Upsampling(Base):
    def __init__(self, export):
        super().__init__(export)
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")

    def forward(self, x):
        y = self.branch(self.c1(x))
        y = self.up(F.interpolate(y, scale_factor=2, mode="nearest"))
        y = aten.upsample_bilinear2d.default(aten.upsample_nearest2d.default(y, [20, 20]), [24, 24], False)
        return self.c2(y)


@FRONT_ENDS
def test_upsampling_passes_channels(export):
    ops = ["aten.upsample_nearest2d.vec", "aten.upsample_bilinear2d.vec"] if export else []
    ops += ["aten.upsample_nearest2d.default", "aten.upsample_bilinear2d.default"]
    _check(Upsampling(export).eval(), torch.randn(1, 3, 5, 5),
           {"c1.weight": (4, 3, 3, 3), "c1.bias": (4,), "c2.weight": (4, 4, 1, 1)}, ops)


# -- padding: the depthwise group of an efficientnet-style block ---------------------------------


class PaddedDepthwise(Base):
    def __init__(self, export):
        super().__init__(export)
        self.c1, self.dw, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, stride=2, groups=8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.branch(self.c1(x))
        y = self.dw(F.pad(y, (0, 1, 0, 1)))  # TF "same" padding
        y = F.pad(y, (1, 1, 1, 1), mode="reflect")
        y = aten.constant_pad_nd.default(y, [1, 1])
        return self.c2(y)


@FRONT_ENDS
def test_pad_keeps_the_depthwise_group_prunable(export):
    ops = ["aten.pad.default", "aten.constant_pad_nd.default"] if export else ["aten.constant_pad_nd.default"]
    shapes = {"c1.weight": (4, 3, 1, 1), "dw.weight": (4, 1, 3, 3), "dw.bias": (4,), "c2.weight": (4, 4, 1, 1)}
    graph, pruned = _check(PaddedDepthwise(export).eval(), torch.randn(1, 3, 8, 8), shapes, ops)
    if export:
        convs = [n.args for n in pruned.graph.nodes if n.target is aten.conv2d.default]
        assert [a[6] for a in convs if len(a) > 6] == [4]  # one group per kept channel


# -- transposed convolutions ------------------------------------------------------------------


class Transposed(Base):
    """conv -> plain transposed conv -> depthwise transposed conv (2 outputs per input) -> conv."""

    def __init__(self, export, n):
        super().__init__(export)
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[n - 1]
        k = (1,) * n
        self.n, self.c1, self.c2 = n, conv(3, 8, 1), conv(12, 4, 1)
        self.w1, self.b1 = nn.Parameter(torch.randn(8, 6, *(2,) * n)), nn.Parameter(torch.randn(6))
        self.w2, self.b2 = nn.Parameter(torch.randn(6, 2, *k)), nn.Parameter(torch.randn(12))

    def forward(self, x):
        f = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self.n - 1]
        y = self.branch(self.c1(x))
        y = f(y, self.w1, self.b1, stride=2)
        y = f(y, self.w2, self.b2, groups=6)
        return self.c2(y)


@FRONT_ENDS
@pytest.mark.parametrize("n", [1, 2, 3])
def test_conv_transpose(export, n):
    k = (1,) * n
    graph, pruned = _check(
        Transposed(export, n).eval(), torch.randn(1, 3, *(3,) * n),
        {"c1.weight": (4, 3, *k), "w1": (4, 3, *(2,) * n), "b1": (3,), "w2": (3, 2, *k), "b2": (6,), "c2.weight": (4, 6, *k)},
        [f"aten.conv_transpose{n}d.input" if n > 1 else "aten.conv_transpose1d.default"] if export else [],
    )
    calls = [c for c in pruned.graph.nodes if "conv_transpose" in str(c.target)]
    groups = [c.args[6] if len(c.args) > 6 else c.kwargs.get("groups", 1) for c in calls]
    assert groups == [1, 3]  # the depthwise one: one group per kept input channel


# -- casts and dropouts (identity on every dim) ----------------------------------------------


class Casts(Base):
    def __init__(self, export):
        super().__init__(export)
        self.c0, self.c1, self.c2, self.c3 = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        h = self.c0(x)
        y = self.branch(self.c1(x))
        y = F.dropout(y, 0.1, False, inplace=True)
        y = F.dropout2d(F.dropout2d(y, 0.1, False), 0.1, False, inplace=True)
        y = torch.feature_dropout(y, 0.1, False)
        y = aten.to.dtype_layout(y.to(torch.float64), dtype=torch.float32, layout=torch.strided)
        y = aten._to_copy.default(y.to(h.device), dtype=torch.float64)
        y = aten.type_as.default(y, h)  # reads only h's dtype: h's channels stay prunable
        return self.c2(y) + self.c3(h)


@FRONT_ENDS
def test_casts_and_dropouts_are_identity(export):
    ops = ["aten.dropout_.default", "aten.feature_dropout.default", "aten.feature_dropout_.default",
           "aten.to.dtype_layout", "aten._to_copy.default", "aten.type_as.default"] if export else []
    _check(Casts(export).eval(), torch.randn(2, 3, 4, 4),
           {"c1.weight": (4, 3, 1, 1), "c2.weight": (4, 4, 1, 1), "c0.weight": (3, 3, 1, 1), "c3.weight": (4, 3, 1, 1)}, ops)


# -- weight norm ------------------------------------------------------------------------------


class RawWeightNorm(Base):
    """``torch._weight_norm(v, g, dim)`` in the forward (fx: ``torch._weight_norm``; export: aten)."""

    def __init__(self, export, dim=0):
        super().__init__(export)
        self.dim, self.c1, self.c2 = dim, nn.Conv1d(4, 6, 1), nn.Conv1d(6, 4, 1)
        self.v = nn.Parameter(torch.randn(6, 6, 3))
        self.g = nn.Parameter(torch.rand(6, 1, 1) + 0.5 if dim == 0 else torch.tensor(2.0))

    def forward(self, x):
        y = self.branch(torch.relu(self.c1(x)))
        return self.c2(torch.relu(F.conv1d(y, torch._weight_norm(self.v, self.g, self.dim), padding=1)))


class ModuleWeightNorm(Base):
    """``nn.utils.parametrizations.weight_norm`` on a conv (wav2vec2's positional conv); fx enters a
    parametrized module, so it sees ``wn.parametrizations.weight()`` and ``F.conv1d``."""

    def __init__(self, export):
        super().__init__(export)
        self.c1, self.c2 = nn.Conv1d(4, 6, 1), nn.Conv1d(6, 4, 1)
        self.wn = parametrizations.weight_norm(nn.Conv1d(6, 6, 3, padding=1))

    def forward(self, x):
        return self.c2(torch.relu(self.wn(self.branch(torch.relu(self.c1(x))))))


class RootWeightNorm(Base):
    """A parametrized model fx enters: its weight is a call of ``parametrizations.weight``."""

    def __init__(self, export):
        super().__init__(export)
        self.c1, self.c2 = nn.Conv1d(4, 6, 1), nn.Conv1d(6, 4, 1)
        self.weight = nn.Parameter(torch.randn(6, 6, 3))

    def forward(self, x):
        return self.c2(torch.relu(F.conv1d(self.branch(torch.relu(self.c1(x))), self.weight, padding=1)))


def _weight_norm_model(kind, export):
    if kind == "root":
        return parametrizations.weight_norm(RootWeightNorm(export)).eval(), "parametrizations.weight.original"
    if kind == "module":
        return ModuleWeightNorm(export).eval(), "wn.parametrizations.weight.original"
    return RawWeightNorm(export).eval(), None


WEIGHT_NORMS = [("raw", True), ("raw", False), ("module", True), ("module", False), ("root", True), ("root", False)]


@pytest.mark.parametrize("kind,export", WEIGHT_NORMS, ids=[f"{k}-{'export' if e else 'fx'}" for k, e in WEIGHT_NORMS])
def test_weight_norm_output_channels_prune_exactly_input_channels_are_cross_channel(kind, export):
    """Output channels (``dim=0``) have their own g and norm: pruned == the original with those
    channels zeroed. Input channels share the norm: their group (c1's outputs) is cross-channel."""
    model, prefix = _weight_norm_model(kind, export)
    g_name, v_name = (f"{prefix}0", f"{prefix}1") if prefix else ("g", "v")
    x = torch.randn(2, 4, 7)
    graph = surgery.trace(model, x)
    assert graph.frontend == ("export" if export else "fx")
    by_param = {(m.module, m.param, m.dim): grp for grp in graph.groups for m in grp.members}
    owner, _, v_leaf = v_name.rpartition(".")
    inputs, outputs = by_param[(owner, v_leaf, 1)], by_param[(owner, v_leaf, 0)]
    assert inputs.prunable and "weight norm" in inputs.cross_channel and by_param[("c1", "weight", 0)] is inputs
    assert outputs.prunable and not outputs.cross_channel and by_param[("c2", "weight", 1)] is outputs
    pruned = run(model, x, "group-l1", 0.5, skip_cross_channel=True, output="graph").model
    shapes = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    assert shapes[v_name] == (3, 6, 3) and shapes[g_name] == (3, 1, 1)
    assert shapes["c2.weight"] == (4, 3, 1) and shapes["c1.weight"] == (6, 4, 1)
    v0, v1 = model.get_parameter(v_name).detach(), pruned.get_parameter(v_name).detach()
    kept = [i for i in range(6) if any(torch.equal(v0[i], row) for row in v1)]
    hook = model.c2.register_forward_pre_hook(lambda m, a: (a[0] * torch.isin(torch.arange(6), torch.tensor(kept))[:, None],))
    try:
        with torch.no_grad():
            expected = model(x)
    finally:
        hook.remove()
    with torch.no_grad():
        assert torch.allclose(pruned(x), expected, atol=1e-5)
    # mask mode zeroes g only along dim (v is exempt: a zeroed row of v would give 0/0)
    check_pruned_equals_masked(model, x, "group-l1", 0.5, output="graph")


@FRONT_ENDS
def test_weight_norm_over_the_whole_tensor_is_cross_channel_on_every_dim(export):
    graph = surgery.trace(RawWeightNorm(export, dim=-1).eval(), torch.randn(2, 4, 7))
    for dim in (0, 1):
        (grp,) = [g for g in graph.groups if any(m.param == "v" and m.dim == dim for m in g.members)]
        assert grp.prunable and "weight norm over the whole tensor" in grp.cross_channel


# -- functional multi-head attention ------------------------------------------------------------


class FunctionalMHA(Base):
    """``F.multi_head_attention_forward`` on the model's own tensors: fused (self-attention) or
    separate projections (cross-attention with a key/value width of its own)."""

    def __init__(self, export, separate=False):
        super().__init__(export)
        self.separate, self.pre, self.post = separate, nn.Linear(5, 8), nn.Linear(8, 3)
        self.kv = nn.Linear(5, 6)
        if separate:
            self.q_w, self.k_w, self.v_w = (nn.Parameter(torch.randn(8, n) / 3) for n in (8, 6, 6))
        else:
            self.in_w = nn.Parameter(torch.randn(24, 8) / 3)
        self.in_b = nn.Parameter(torch.randn(24))
        self.out_w, self.out_b = nn.Parameter(torch.randn(8, 8) / 3), nn.Parameter(torch.randn(8))

    def forward(self, x):
        q = self.branch(self.pre(x))
        kv = self.kv(x) if self.separate else q
        extra = dict(use_separate_proj_weight=True, q_proj_weight=self.q_w, k_proj_weight=self.k_w,
                     v_proj_weight=self.v_w) if self.separate else {}
        a, _ = F.multi_head_attention_forward(
            q, kv, kv, 8, 2, None if self.separate else self.in_w, self.in_b, None, None, False, 0.0, self.out_w,
            self.out_b, training=False, need_weights=False, **extra)
        return self.post(a + q)


@pytest.mark.parametrize("separate", [False, True], ids=["fused", "separate"])
def test_functional_multi_head_attention_prunes_whole_heads(separate):
    model, x = FunctionalMHA(False, separate).eval(), torch.randn(4, 2, 5)  # (L, N, E)
    emb = {"pre.weight": (4, 5), "in_b": (12,), "out_w": (4, 4), "out_b": (4,), "post.weight": (3, 4)}
    emb.update({"q_w": (4, 4), "k_w": (4, 3), "v_w": (4, 3), "kv.weight": (3, 5)} if separate else {"in_w": (12, 4)})
    graph, pruned = _check(model, x, emb)
    (call,) = [n for n in pruned.graph.nodes if n.target is F.multi_head_attention_forward]
    assert call.args[3:5] == (4, 1)  # embed_dim_to_check and num_heads: one head of 4 channels left
    (heads,) = [g for g in graph.groups if any(m.module == "pre" and m.dim == 0 for m in g.members)]
    assert heads.size == 2  # units are whole heads


# -- advanced indexing (index tensors) ---------------------------------------------------------


class TextPooling(Base):
    """CLIP's text pooling: the features of each sequence's end token, ``x[arange(B), text.argmax(-1)]``."""

    def __init__(self, export):
        super().__init__(export)
        self.embed, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, feats, text):
        x = self.branch(self.embed(feats))  # (B, T, C)
        return self.head(x[torch.arange(x.shape[0]), text.argmax(dim=-1)])


class IndexMix(Base):
    """Index tensors with slices and ints around them: adjacent ones stay in place, separated ones
    go first (torch applies ints first), and a constant slice of the channels keeps its offset."""

    def __init__(self, export):
        super().__init__(export)
        self.conv, self.head, self.tail = nn.Conv1d(3, 8, 1), nn.Linear(8, 2), nn.Linear(4, 2)
        self.register_buffer("t_idx", torch.tensor([0, 2, 5]))
        self.register_buffer("b_idx", torch.tensor([1, 0]))

    def forward(self, x):
        h = self.branch(self.conv(x))  # (B=2, C=8, T=6)
        a = h[:, :, self.t_idx].mean(-1)  # (B, C)
        b = h[self.b_idx, :, self.t_idx[:2]]  # separated: (2, C)
        c = h[0, :, self.t_idx].t().mean(0)  # int first, then the index: (C, 3) -> (C,)
        d = h[:, 2:6, self.t_idx][:, :, 0]  # (B, 4): channels 2..5 read once more, a group of their own
        return self.head(a + b + c) + self.tail(d)


@FRONT_ENDS
def test_index_tensors_consume_their_dims_channels_pass_through(export):
    model = TextPooling(export).eval()
    feats, text = torch.randn(2, 5, 4), torch.randint(0, 9, (2, 5))
    _check(model, (feats, text), {"embed.weight": (4, 4), "embed.bias": (4,), "head.weight": (3, 4)},
           ["aten.index.Tensor"] if export else [])


@FRONT_ENDS
def test_index_tensors_mixed_with_slices_and_ints(export):
    model, x = IndexMix(export).eval(), torch.randn(2, 3, 6)
    graph, pruned = _check(model, x, {"conv.weight": (4, 3, 1), "head.weight": (2, 4), "tail.weight": (2, 2)},
                           ["aten.index.Tensor"] if export else [])
    groups = [g for g in graph.groups if any(m.module == "conv" and m.dim == 0 for m in g.members)]
    assert [(g.size, g.prunable) for g in groups] == [(4, True), (4, True)]  # channels 0, 1, 6, 7 and 2..5


def test_bool_mask_index_stays_stopped():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 8, 1)
            self.register_buffer("keep", torch.tensor([True, False, True, True, False, True]))

        def forward(self, x):
            return self.conv(x)[:, :, self.keep]

    graph = surgery.trace(Masked().eval(), torch.randn(2, 3, 6))
    (grp,) = [g for g in graph.groups if any(m.module == "conv" and m.dim == 0 for m in g.members)]
    assert not grp.prunable


# -- untraceable models: the message names the user's frame and both front ends -------------------


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a value: neither front end traces it
            return self.c(x)
        return x


def test_untraceable_message_names_both_front_ends_and_the_users_line():
    with pytest.raises(TraceError) as err:
        surgery.trace(ValueBranch(), torch.randn(1, 3, 4, 4))
    msg = str(err.value)
    line = r"test_aten_rules\.py:\d+ `if x\.sum\(\) > 0:"
    assert msg.startswith("both front ends failed. torch.fx: cannot trace ValueBranch")
    fx_part, _, export_part = msg.partition(" torch.export: ")
    assert export_part, msg
    assert re.search(line, fx_part) and "leaf_modules" in fx_part, msg
    assert re.search(line, export_part), msg  # the export attempt was made, and fails at the same line
    assert "/surgery/" not in msg, msg


def test_frames_of_torchvision_are_the_users_not_torchs():
    """``torchvision/`` starts with torch's directory name; its frames are where tracing broke."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.optical_flow.raft_small()
    images = (torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128))
    with pytest.raises(TraceError, match=r"torchvision/models/optical_flow/raft\.py:\d+ `") as err:
        tracing.trace_graph(model, images, fallback=False)
    assert "surgery/dependency_graph" not in str(err.value)
