"""Engine crash classes, each on a tiny model: argument normalisation (negative dims, keyword
arguments, negative tuple indices), a rule that raises, the Hugging Face attention reshape,
``nn.MultiheadAttention`` with ``kdim``/``vdim`` and cross-attention, and the aten front end's
``embedding`` / ``select``."""

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
from surgery.dependency_graph.rules import module_rule  # noqa: E402


def _group_of(graph, module: str, param: str, dim: int):
    found = [g for g in graph.groups if any(m.module == module and m.param == param and m.dim == dim for m in g.members)]
    assert len(found) == 1, f"{module}.{param}[dim {dim}] is in {len(found)} groups"
    return found[0]


# ---------------------------------------------------------------------------------------------
# 1. arguments normalised once: negative dims, keyword arguments, negative tuple indices
# ---------------------------------------------------------------------------------------------


class SplitNet(nn.Module):
    """Linear(6 -> 8), split on the last dim into parts of 3 and 5 channels, one Linear per part."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a = nn.Linear(6, 8)
        self.b1 = nn.Linear(3, 4)
        self.b2 = nn.Linear(5, 4)

    def forward(self, x):
        y = self.a(x)
        how = self.how
        if how == "torch.split dim=-1, [-1]":
            parts = torch.split(y, [3, 5], dim=-1)
            p, q = parts[0], parts[-1]
        elif how == "Tensor.split(sizes, -1)[-2], [-1]":
            parts = y.split([3, 5], -1)
            p, q = parts[-2], parts[-1]
        elif how == "torch.split keywords only":
            p, q = torch.split(tensor=y, split_size_or_sections=[3, 5], dim=-1)
        elif how == "Tensor.split(split_size=..., dim=-1)":
            p, q = y.split(split_size=[3, 5], dim=-1)
        elif how == "torch.tensor_split(indices=(3,), dim=2)":
            p, q = torch.tensor_split(y, indices=(3,), dim=2)
        elif how == "Tensor.tensor_split((3,), -1)":
            p, q = y.tensor_split((3,), -1)
        else:
            raise ValueError(how)
        return self.b1(p) + self.b2(q)


SPLITS = [
    "torch.split dim=-1, [-1]",
    "Tensor.split(sizes, -1)[-2], [-1]",
    "torch.split keywords only",
    "Tensor.split(split_size=..., dim=-1)",
    "torch.tensor_split(indices=(3,), dim=2)",
    "Tensor.tensor_split((3,), -1)",
]


@pytest.mark.parametrize("how", SPLITS)
def test_split_negative_dim_and_keywords(how):
    model, x = SplitNet(how), torch.randn(2, 5, 6)
    graph = surgery.trace(model, x)
    assert sorted(g.size for g in graph.prunable_groups) == [3, 5]  # one group per part
    plan, pruned, _ = check_pruned_equals_masked(model, x, ratio=0.5)
    assert tuple(pruned.a.weight.shape) == (5, 6)  # 3 -> 2 and 5 -> 3 channels
    assert tuple(pruned.b1.weight.shape) == (4, 2)
    assert tuple(pruned.b2.weight.shape) == (4, 3)


class ChunkNet(nn.Module):
    """Linear(6 -> 8), two equal parts on the last dim (chunk / tensor_split by count)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        y = self.a(x)
        if self.how == "torch.chunk(dim=-1)[-1]":
            parts = torch.chunk(y, 2, dim=-1)
        elif self.how == "Tensor.chunk(2, -1)[-1]":
            parts = y.chunk(2, -1)
        elif self.how == "torch.tensor_split(sections=2, dim=-1)":
            parts = torch.tensor_split(y, sections=2, dim=-1)
        else:
            raise ValueError(self.how)
        return self.b(parts[0]) * self.b(parts[-1])


@pytest.mark.parametrize("how", ["torch.chunk(dim=-1)[-1]", "Tensor.chunk(2, -1)[-1]", "torch.tensor_split(sections=2, dim=-1)"])
def test_chunk_negative_dim_and_index(how):
    model, x = ChunkNet(how), torch.randn(2, 5, 6)
    # both halves feed the same Linear, so half i and half j go together: one group of 4
    graph = surgery.trace(model, x)
    assert [g.size for g in graph.prunable_groups] == [4]
    _, pruned, _ = check_pruned_equals_masked(model, x, ratio=0.5)
    assert tuple(pruned.a.weight.shape) == (4, 6)
    assert tuple(pruned.b.weight.shape) == (3, 2)


class SelectNet(nn.Module):
    """Linear(6 -> 8) on (B, L, C); the last position taken with ``select(1, -1)``; Linear(8 -> 3)."""

    def __init__(self, method: bool):
        super().__init__()
        self.method = method
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        y = self.a(x)
        y = y.select(-2, -1) if self.method else torch.select(y, dim=1, index=-1)
        return self.b(y)


@pytest.mark.parametrize("method", [False, True], ids=["torch.select", "Tensor.select"])
def test_select_passes_channels(method):
    model, x = SelectNet(method), torch.randn(2, 5, 6)
    _, pruned, _ = check_pruned_equals_masked(model, x, ratio=0.5)
    assert tuple(pruned.a.weight.shape) == (4, 6)
    assert tuple(pruned.b.weight.shape) == (3, 4)


def test_unbind_and_cat_negative_dims():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(16, 3)

        def forward(self, x):  # x: (B, 2, 6)
            first, second = self.a(x).unbind(dim=-2)
            return self.b(torch.cat([first, second], dim=-1))

    model, x = Net(), torch.randn(3, 2, 6)
    _, pruned, _ = check_pruned_equals_masked(model, x, ratio=0.5)
    assert tuple(pruned.a.weight.shape) == (4, 6)
    assert tuple(pruned.b.weight.shape) == (3, 8)


# ---------------------------------------------------------------------------------------------
# 2. a rule that raises stops its node's channels; the trace goes on
# ---------------------------------------------------------------------------------------------


class Exploding(nn.Linear):
    """A Linear subclass whose (test-only) rule couples a little, then raises."""


@module_rule(Exploding)
def _exploding_rule(ctx):
    ctx.identity(ctx.sp(ctx.input, -1), ctx.p("weight", 1))  # a coupling made before the failure
    raise ValueError("boom: cannot explain this node\nsecond line")


class ExplodingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(6, 8)
        self.boom = Exploding(8, 8)
        self.post = nn.Linear(8, 3)
        self.side1 = nn.Linear(6, 10)
        self.side2 = nn.Linear(10, 3)

    def forward(self, x):
        return self.post(self.boom(self.pre(x))) + self.side2(torch.relu(self.side1(x)))


def test_raising_rule_stops_its_node_and_trace_goes_on():
    model, x = ExplodingNet(), torch.randn(2, 6)
    graph = surgery.trace(model, x, leaf_modules=[Exploding])
    node = next(n for n in graph.fx_graph.nodes if n.target == "boom")
    expected = f"{node.format_node()}: rule raised ValueError: boom: cannot explain this node"
    for module, param, dim in (("pre", "weight", 0), ("boom", "weight", 1), ("boom", "weight", 0), ("post", "weight", 1)):
        g = _group_of(graph, module, param, dim)
        assert not g.prunable and g.reason is Reason.UNSUPPORTED_OP
        assert g.reason_detail.endswith(f"({expected})"), g.reason_detail
    side = _group_of(graph, "side1", "weight", 0)
    assert side.prunable and side.size == 10
    _, pruned, _ = check_pruned_equals_masked(model, x, ratio=0.5, leaf_modules=[Exploding])
    assert tuple(pruned.side1.weight.shape) == (5, 6)
    assert tuple(pruned.side2.weight.shape) == (3, 5)
    assert tuple(pruned.pre.weight.shape) == (8, 6)
    assert tuple(pruned.boom.weight.shape) == (8, 8)


# ---------------------------------------------------------------------------------------------
# 3. the Hugging Face attention reshape: view(y.size()[:-1] + (heads, head_dim)) and back
# ---------------------------------------------------------------------------------------------


class HFReshape(nn.Module):
    """Linear(8 -> 8), split into 2 heads of 4 through a size tuple, merged back, Linear(8 -> 8)."""

    def __init__(self, explicit: bool = False):
        super().__init__()
        self.explicit = explicit
        self.lin1 = nn.Linear(8, 8)
        self.lin2 = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin1(x)
        if self.explicit:  # the same reshapes with explicit sizes
            b, n = x.size(0), x.size(1)
            return self.lin2(y.view(b, n, 2, 4).reshape(b, n, 8))
        y = y.view(y.size()[:-1] + (2, 4))
        y = y.view(y.size()[:-2] + (8,))
        return self.lin2(y)


def _shape_literals(gm) -> list:
    import operator

    return [n.args[1] for n in gm.graph.nodes if n.target is operator.add and isinstance(n.args[1], tuple)]


def test_hf_size_tuple_reshape_prunes_like_explicit_sizes():
    x = torch.randn(2, 3, 8)
    hf, explicit = HFReshape(), HFReshape(explicit=True)
    explicit.load_state_dict(hf.state_dict())
    g_hf, g_ex = surgery.trace(hf, x), surgery.trace(explicit, x)
    # the engine's reshape rule takes the head_dim coordinate as the channel: 4 units of 2 entries (one per head)
    assert [(g.size, g.prunable) for g in g_hf.groups] == [(g.size, g.prunable) for g in g_ex.groups]
    inner = _group_of(g_hf, "lin1", "weight", 0)
    assert inner.prunable and inner.size == 4
    assert [sorted(i) for i in next(m for m in inner.members if m.module == "lin1").index_map()] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    plan_hf, pruned_hf, _ = check_pruned_equals_masked(hf, x, ratio=0.5)
    plan_ex, pruned_ex, _ = check_pruned_equals_masked(explicit, x, ratio=0.5)
    assert [g.keep for g in plan_hf.groups] == [g.keep for g in plan_ex.groups]
    assert tuple(pruned_hf.lin1.weight.shape) == (4, 8)
    assert tuple(pruned_hf.lin2.weight.shape) == (8, 4)
    assert _shape_literals(pruned_hf) == [(2, 2), (4,)]  # both constants recomputed
    with torch.no_grad():
        assert torch.allclose(pruned_hf(x), pruned_ex(x), atol=1e-6)
        assert pruned_hf(torch.randn(5, 7, 8)).shape == (5, 7, 8)  # runs on other batch/sequence sizes


class HFSelfAttention(nn.Module):
    """BERT-style self-attention: q/k/v Linears, ``transpose_for_scores`` through size tuples,
    softmax over keys, the context merged back with ``size()[:-2] + (all_head_size,)``."""

    def __init__(self, hidden: int = 16, heads: int = 2):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query, self.key, self.value = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def split_heads(self, t):
        return t.view(t.size()[:-1] + (self.heads, self.head_dim)).permute(0, 2, 1, 3)

    def forward(self, x):
        q, k, v = self.split_heads(self.query(x)), self.split_heads(self.key(x)), self.split_heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.head_dim**0.5
        ctx = torch.matmul(scores.softmax(dim=-1), v).permute(0, 2, 1, 3).contiguous()
        ctx = ctx.view(ctx.size()[:-2] + (self.heads * self.head_dim,))
        return self.out(ctx)


def test_hf_self_attention_block():
    model, x = HFSelfAttention(), torch.randn(2, 5, 16)
    graph = surgery.trace(model, x)
    heads = _group_of(graph, "query", "weight", 0)  # whole heads are the unit (rules/heads.py)
    for name, dim in (("key", 0), ("value", 0), ("out", 1)):
        assert _group_of(graph, name, "weight", dim) is heads
    assert heads.prunable and heads.size == 2
    _, pruned, _ = check_pruned_equals_masked(model, x, ratio=0.5)
    for name in ("query", "key", "value"):
        assert tuple(getattr(pruned, name).weight.shape) == (8, 16)
    assert tuple(pruned.out.weight.shape) == (16, 8)
    assert sorted(_shape_literals(pruned)) == [(1, 8), (1, 8), (1, 8), (8,)]


class SharedShape(nn.Module):
    """One size tuple ``x.size()[:-1] + (2, 4)`` used by two views, and also by ``new_zeros``."""

    def __init__(self, zeros: bool):
        super().__init__()
        self.zeros = zeros
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(16, 3)

    def forward(self, x):
        shape = x.size()[:-1] + (2, 4)
        p, q = self.a(x).view(shape), self.b(x).view(shape)
        y = torch.cat([p, q], dim=-1)
        if self.zeros:
            y = y + x.new_zeros(shape).repeat(1, 1, 1, 2)
        return self.c(y.flatten(-2))


def test_shared_size_constant_keeps_equal_counts():
    model, x = SharedShape(zeros=False), torch.randn(2, 3, 8)
    _, pruned, _ = check_pruned_equals_masked(model, x, ratio=0.5)
    assert tuple(pruned.a.weight.shape) == tuple(pruned.b.weight.shape)  # one constant sizes both views
    assert _shape_literals(pruned) == [(2, tuple(pruned.a.weight.shape)[0] // 2)]


def test_size_constant_used_elsewhere_is_left_whole_with_reason():
    model, x = SharedShape(zeros=True), torch.randn(2, 3, 8)
    graph = surgery.trace(model, x)
    g = _group_of(graph, "a", "weight", 0)
    assert not g.prunable and g.reason is Reason.FIXED_DIM
    assert "shape tuple add has sizes the rewrite cannot recompute" in g.reason_detail
    check_pruned_equals_masked(model, x, ratio=0.5)


# ---------------------------------------------------------------------------------------------
# 4. nn.MultiheadAttention: cross-attention, kdim / vdim
# ---------------------------------------------------------------------------------------------


class CrossAttention(nn.Module):
    """Queries from ``x`` (Linear 6 -> 16), keys/values from ``mem`` (Linear 5 -> kdim / vdim), 4 heads."""

    def __init__(self, kdim=None, vdim=None, batch_first=False, shared_kv=False):
        super().__init__()
        self.shared_kv = shared_kv
        self.q_in = nn.Linear(6, 16)
        self.k_in = nn.Linear(5, kdim or 16)
        self.v_in = nn.Linear(5, vdim or 16)
        self.attn = nn.MultiheadAttention(16, 4, kdim=kdim, vdim=vdim, batch_first=batch_first)
        self.head = nn.Linear(16, 3)

    def forward(self, x, mem):
        k = self.k_in(mem)
        v = k if self.shared_kv else self.v_in(mem)
        y, _ = self.attn(self.q_in(x), k, v, need_weights=False)
        return self.head(y)


def _cross_inputs(batch_first: bool):
    x, mem = torch.randn(3, 2, 6), torch.randn(7, 2, 5)  # (L, N, C) / (S, N, C)
    return (x.transpose(0, 1), mem.transpose(0, 1)) if batch_first else (x, mem)


@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_cross_attention_same_embed_dim(batch_first):
    model, inputs = CrossAttention(batch_first=batch_first), _cross_inputs(batch_first)
    graph = surgery.trace(model, inputs)
    g = _group_of(graph, "attn", "in_proj_weight", 1)
    assert g.prunable and g.size == 4  # whole heads, through the query, key and value producers
    assert g is _group_of(graph, "q_in", "weight", 0) is _group_of(graph, "k_in", "weight", 0)
    assert g is _group_of(graph, "v_in", "weight", 0)
    _, pruned, _ = check_pruned_equals_masked(model, inputs, ratio=0.5)
    assert tuple(pruned.attn.in_proj_weight.shape) == (24, 8)
    assert tuple(pruned.attn.out_proj.weight.shape) == (8, 8)
    assert (pruned.attn.embed_dim, pruned.attn.num_heads, pruned.attn.head_dim) == (8, 2, 4)
    for name in ("q_in", "k_in", "v_in"):
        assert getattr(pruned, name).weight.shape[0] == 8


@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_kdim_vdim(batch_first):
    model, inputs = CrossAttention(kdim=10, vdim=12, batch_first=batch_first), _cross_inputs(batch_first)
    graph = surgery.trace(model, inputs)
    kg, vg = _group_of(graph, "attn", "k_proj_weight", 1), _group_of(graph, "attn", "v_proj_weight", 1)
    assert kg.prunable and kg.size == 10 and kg is _group_of(graph, "k_in", "weight", 0)
    assert vg.prunable and vg.size == 12 and vg is _group_of(graph, "v_in", "weight", 0)
    eg = _group_of(graph, "attn", "q_proj_weight", 1)
    assert eg.prunable and eg.size == 4 and eg is _group_of(graph, "attn", "k_proj_weight", 0)
    _, pruned, _ = check_pruned_equals_masked(model, inputs, ratio=0.5)
    a = pruned.attn
    assert (a.embed_dim, a.kdim, a.vdim, a.num_heads) == (8, 5, 6, 2)
    assert tuple(a.q_proj_weight.shape) == (8, 8)
    assert tuple(a.k_proj_weight.shape) == (8, 5)
    assert tuple(a.v_proj_weight.shape) == (8, 6)
    assert tuple(a.in_proj_bias.shape) == (24,)
    assert tuple(pruned.k_in.weight.shape) == (5, 5) and tuple(pruned.v_in.weight.shape) == (6, 5)


def test_mha_shared_key_value_with_kdim():
    model, inputs = CrossAttention(kdim=10, vdim=10, shared_kv=True), _cross_inputs(False)
    graph = surgery.trace(model, inputs)
    kv = _group_of(graph, "attn", "k_proj_weight", 1)
    assert kv is _group_of(graph, "attn", "v_proj_weight", 1) and kv.prunable and kv.size == 10
    _, pruned, _ = check_pruned_equals_masked(model, inputs, ratio=0.5)
    assert (pruned.attn.kdim, pruned.attn.vdim) == (5, 5)


# ---------------------------------------------------------------------------------------------
# 6. the export front end: aten.embedding (weight first) and aten.select.int
# ---------------------------------------------------------------------------------------------


class ShapeBranchTokens(nn.Module):
    """Embedding -> Linear on (B, L) token ids, the last position taken with ``select``; a Python
    branch on a shape makes fx fail, so ``torch.export`` traces it (aten graph)."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):
        e = F.embedding(tokens, self.emb.weight) if self.functional else self.emb(tokens)
        if e.shape[1] > 2:
            e = e * 2.0
        return self.head(torch.relu(self.lin(e)).select(1, -1))


@pytest.mark.parametrize("functional", [False, True], ids=["nn.Embedding", "F.embedding"])
def test_export_embedding_and_select(functional):
    model, tokens = ShapeBranchTokens(functional), torch.randint(0, 20, (2, 5))
    graph = surgery.trace(model, tokens)
    assert graph.frontend == "export"
    targets = {n.target for n in graph.fx_graph.nodes}
    assert torch.ops.aten.embedding.default in targets and torch.ops.aten.select.int in targets
    emb = _group_of(graph, "emb", "weight", 1)
    assert emb.prunable and emb.size == 8 and emb is _group_of(graph, "lin", "weight", 1)
    lin = _group_of(graph, "lin", "weight", 0)
    assert lin.prunable and lin.size == 6 and lin is _group_of(graph, "head", "weight", 1)
    assert not any(m.module == "emb" and m.dim == 0 for g in graph.prunable_groups for m in g.members)  # vocabulary
    _, pruned, _ = check_pruned_equals_masked(model, tokens, ratio=0.5)
    assert tuple(pruned.get_parameter("emb.weight").shape) == (20, 4)
    assert tuple(pruned.get_parameter("lin.weight").shape) == (3, 4)
    assert tuple(pruned.get_parameter("head.weight").shape) == (3, 3)


def test_functional_embedding_fx():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(20, 8))
            self.lin = nn.Linear(8, 3)

        def forward(self, tokens):
            return self.lin(F.embedding(tokens, self.table, padding_idx=0).select(1, 0))

    model, tokens = Net(), torch.randint(0, 20, (2, 5))
    _, pruned, _ = check_pruned_equals_masked(model, tokens, ratio=0.5)
    assert tuple(pruned.table.shape) == (20, 4)
    assert tuple(pruned.lin.weight.shape) == (3, 4)
