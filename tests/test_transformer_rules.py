"""Transformer attention in the engine (issue 11, points 2-4): whole heads, GQA KV groups and the
hidden size are prunable, and buffers never form groups.

First each pattern alone in pure torch (both front ends where fx can trace it: ``export=True`` makes
``forward`` branch on a shape, so ``torch.export`` takes over), then the tiny Hugging Face models of
``hf_models.py`` (skipped without transformers). Expected shapes are for ``group-l1`` at ratio 0.5.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import check_pruned_equals_masked, rel_err  # noqa: E402

import surgery  # noqa: E402
from surgery.module_tree import output_tensors  # noqa: E402
from surgery.planner import plan_from_graph  # noqa: E402
from surgery.rewrite import apply_to_graph  # noqa: E402

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


def _prunable(graph, param: str):
    """The prunable groups with a member on ``param`` (``"q.weight"``)."""
    return [g for g in graph.groups if g.prunable and any(m.name == param for m in g.members)]


def _member(group, param: str, dim: int):
    return next(m for m in group.members if m.name == param and m.dim == dim)


def _pruned_shapes(model, x, names, **options):
    _, pruned, _ = check_pruned_equals_masked(model, x, "group-l1", 0.5, output="graph", **options)
    state = pruned.state_dict()
    return {k: tuple(state[k].shape) for k in names}


# -- attention: heads are the unit ----------------------------------------------------------------


class Attention(Base):
    """q/k/v projections split by ``view(b, s, -1, head_dim)`` (head_dim 16 > 4 heads), sdpa with an
    additive float mask (or a learnt per-head bias, as T5/BEiT pass), ``enable_gqa`` or HF's
    ``repeat_kv`` (expand + reshape) for 2 KV heads, and the merge back into the output projection."""

    def __init__(self, export, kv_heads=4, gqa="none", bias=False, heads_literal=False):
        super().__init__(export)
        self.h, self.kv, self.d, self.gqa, self.heads_literal = 4, kv_heads, 16, gqa, heads_literal
        self.q = nn.Linear(32, self.h * self.d)
        self.k = nn.Linear(32, kv_heads * self.d)
        self.v = nn.Linear(32, kv_heads * self.d)
        self.o = nn.Linear(self.h * self.d, 32)
        self.bias = nn.Parameter(torch.randn(self.h, 6, 6)) if bias else None

    def split(self, t, heads):
        b, s, _ = t.shape
        return t.view(b, s, heads if self.heads_literal else -1, self.d).transpose(1, 2)

    def forward(self, x):
        x = self.branch(x)
        b, s, _ = x.shape
        q, k, v = self.split(self.q(x), self.h), self.split(self.k(x), self.kv), self.split(self.v(x), self.kv)
        if self.gqa == "repeat_kv":
            n_rep = self.h // self.kv
            k = k[:, :, None].expand(b, self.kv, n_rep, s, self.d).reshape(b, self.kv * n_rep, s, self.d)
            v = v[:, :, None].expand(b, self.kv, n_rep, s, self.d).reshape(b, self.kv * n_rep, s, self.d)
        mask = torch.triu(torch.full((s, s), -1e4), 1)[None, None]  # float, broadcast over batch and heads
        if self.bias is not None:
            mask = mask + self.bias[None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.gqa == "enable_gqa")
        return self.o(y.transpose(1, 2).reshape(b, s, self.h * self.d))


@FRONT_ENDS
@pytest.mark.parametrize("heads_literal", [False, True], ids=["view-minus-one", "view-heads"])
def test_sdpa_with_float_mask_prunes_whole_heads(export, heads_literal):
    model, x = Attention(export, heads_literal=heads_literal).eval(), torch.randn(2, 6, 32)
    graph = surgery.trace(model, x)
    [heads] = _prunable(graph, "q.weight")
    assert heads.size == 4 and not heads.cross_channel
    for name, dim in (("q.weight", 0), ("k.weight", 0), ("v.weight", 0), ("o.weight", 1)):
        assert _member(heads, name, dim).index_map()[1] == list(range(16, 32))  # head 1: all 16 coordinates
    shapes = _pruned_shapes(model, x, ["q.weight", "k.bias", "v.weight", "o.weight"])
    assert shapes == {"q.weight": (32, 32), "k.bias": (32,), "v.weight": (32, 32), "o.weight": (32, 32)}


@FRONT_ENDS
def test_per_head_bias_in_the_mask_goes_with_its_head(export):
    model, x = Attention(export, bias=True).eval(), torch.randn(2, 6, 32)
    [heads] = _prunable(surgery.trace(model, x), "q.weight")
    assert heads.size == 4 and _member(heads, "bias", 0).index_map() == [[0], [1], [2], [3]]
    assert _pruned_shapes(model, x, ["bias", "q.weight"]) == {"bias": (2, 6, 6), "q.weight": (32, 32)}


@FRONT_ENDS
@pytest.mark.parametrize("gqa", ["enable_gqa", "repeat_kv"])
def test_gqa_kv_head_goes_with_its_query_group(export, gqa):
    model, x = Attention(export, kv_heads=2, gqa=gqa).eval(), torch.randn(2, 6, 32)
    [group] = _prunable(surgery.trace(model, x), "q.weight")
    assert group.size == 2  # one unit per KV head
    assert _member(group, "k.weight", 0).index_map()[1] == list(range(16, 32))
    assert _member(group, "q.weight", 0).index_map()[1] == list(range(32, 64))  # query heads 2 and 3
    shapes = _pruned_shapes(model, x, ["q.weight", "k.weight", "v.bias", "o.weight"])
    assert shapes == {"q.weight": (32, 32), "k.weight": (16, 32), "v.bias": (16,), "o.weight": (32, 32)}


@FRONT_ENDS
@pytest.mark.parametrize("gqa", ["enable_gqa", "repeat_kv"])
def test_gqa_query_option_prunes_query_positions_and_keeps_kv_heads(export, gqa):
    """``gqa="query"``: one unit is the same query-head position in every KV group (query heads 0 and 2,
    then 1 and 3, for 4 query heads over 2 KV heads), so every group keeps as many query heads; the KV
    heads stay whole with the reason. With ``repeat_kv`` the expand's copy count shrinks with them."""
    model, x = Attention(export, kv_heads=2, gqa=gqa).eval(), torch.randn(2, 6, 32)
    graph = surgery.trace(model, x, gqa="query")
    [group] = _prunable(graph, "q.weight")
    assert group.size == 2 and not _prunable(graph, "k.weight") and not _prunable(graph, "v.weight")
    assert _member(group, "q.weight", 0).index_map() == [list(range(0, 16)) + list(range(32, 48)),
                                                         list(range(16, 32)) + list(range(48, 64))]
    assert _member(group, "o.weight", 1).index_map()[1] == list(range(16, 32)) + list(range(48, 64))
    [kv] = [g for g in graph.groups if any((m.name, m.dim) == ("k.weight", 0) for m in g.members) and g.size == 2]
    assert "gqa='query': the KV heads stay" in kv.reason_detail
    shapes = _pruned_shapes(model, x, ["q.weight", "k.weight", "v.bias", "o.weight"], gqa="query")
    assert shapes == {"q.weight": (32, 32), "k.weight": (32, 32), "v.bias": (32,), "o.weight": (32, 32)}


def test_gqa_option_is_checked():
    model, x = Attention(True, kv_heads=2, gqa="repeat_kv").eval(), torch.randn(2, 6, 32)
    with pytest.raises(surgery.errors.PlanError, match="unknown gqa 'heads'; known: kv, query"):
        surgery.plan(model, x, "l1", gqa="heads")


class EagerAttention(Base):
    """GPT-2-style eager attention with a fused qkv projection: softmax(q @ k.T * scale) @ v."""

    def __init__(self, export):
        super().__init__(export)
        self.qkv, self.o = nn.Linear(32, 3 * 64), nn.Linear(64, 32)

    def forward(self, x):
        x = self.branch(x)
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, -1, 16).transpose(1, 2) for t in self.qkv(x).split(64, dim=2))
        probs = torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1)
        return self.o((probs @ v).transpose(1, 2).reshape(b, s, 64))


@FRONT_ENDS
def test_eager_attention_prunes_whole_heads(export):
    model, x = EagerAttention(export).eval(), torch.randn(2, 5, 32)
    [heads] = _prunable(surgery.trace(model, x), "o.weight")
    assert heads.size == 4
    assert _member(heads, "qkv.weight", 0).index_map()[0] == [*range(16), *range(64, 80), *range(128, 144)]
    assert _pruned_shapes(model, x, ["qkv.weight", "o.weight"]) == {"qkv.weight": (96, 32), "o.weight": (32, 32)}


# -- RMSNorm by hand, addmm, embedding, select -------------------------------------------------------


class RMSNormNet(Base):
    """Embedding -> RMSNorm written out (pow, mean, rsqrt, casts) -> linear, plus a residual."""

    def __init__(self, export):
        super().__init__(export)
        self.emb = nn.Embedding(20, 24)
        self.w = nn.Parameter(torch.rand(24) + 0.5)
        self.fc, self.out = nn.Linear(24, 24), nn.Linear(24, 5)

    def norm(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.w * h.to(x.dtype)

    def forward(self, ids):
        x = self.branch(self.emb(ids))
        x = x + self.fc(self.norm(x))
        return self.out(self.norm(x))


@FRONT_ENDS
def test_hand_written_rmsnorm_is_a_cross_channel_hidden_group(export):
    model, ids = RMSNormNet(export).eval(), torch.randint(0, 20, (2, 7))
    graph = surgery.trace(model, ids)
    [hidden] = _prunable(graph, "emb.weight")
    assert hidden.size == 24 and "broadcast back" in hidden.cross_channel
    assert {m.name for m in hidden.members} >= {"emb.weight", "w", "fc.weight", "fc.bias", "out.weight"}
    plan = plan_from_graph(model, graph, "group-l1", 0.5)  # the cross-channel group pruned too
    pruned = apply_to_graph(graph, plan, "prune", "graph")
    assert pruned.state_dict()["emb.weight"].shape == (20, 12)
    assert pruned(torch.randint(0, 20, (3, 9))).shape == (3, 9, 5)
    skipped = plan_from_graph(model, graph, "group-l1", 0.5, skip_cross_channel=True)
    assert hidden.id not in {gp.id for gp in skipped.groups}


class Conv1D(nn.Module):
    """GPT-2's Conv1D: a weight of shape (in, out) applied with ``addmm``."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(nx, nf) * 0.2), nn.Parameter(torch.randn(nf))

    def forward(self, x):
        size = x.size()[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size)


class AddmmNet(Base):
    def __init__(self, export):
        super().__init__(export)
        self.fc, self.proj = Conv1D(8, 16), Conv1D(16, 4)

    def forward(self, x):
        return self.proj(torch.relu(self.fc(self.branch(x))))


@FRONT_ENDS
def test_addmm_weight_is_in_by_out(export):
    model, x = AddmmNet(export).eval(), torch.randn(2, 3, 8)
    [group] = _prunable(surgery.trace(model, x), "fc.weight")
    assert {(m.name, m.dim) for m in group.members} == {("fc.weight", 1), ("fc.bias", 0), ("proj.weight", 0)}
    shapes = _pruned_shapes(model, x, ["fc.weight", "fc.bias", "proj.weight"])
    assert shapes == {"fc.weight": (8, 8), "fc.bias": (8,), "proj.weight": (8, 4)}


class EmbedSelect(Base):
    """A functional embedding (``aten.embedding``: weight first), ``select`` of the first token."""

    def __init__(self, export):
        super().__init__(export)
        self.table = nn.Parameter(torch.randn(30, 16))
        self.fc = nn.Linear(16, 3)

    def forward(self, ids):
        e = self.branch(F.embedding(ids, self.table))
        return self.fc(torch.relu(e).select(1, 0))


@FRONT_ENDS
def test_embedding_and_select(export):
    model, ids = EmbedSelect(export).eval(), torch.randint(0, 30, (2, 5))
    graph = surgery.trace(model, ids)
    if export:
        assert {aten.embedding.default, aten.select.int} <= {n.target for n in graph.fx_graph.nodes}
    [group] = _prunable(graph, "table")
    assert {(m.name, m.dim) for m in group.members} == {("table", 1), ("fc.weight", 1)}
    assert _pruned_shapes(model, ids, ["table", "fc.weight"]) == {"table": (30, 8), "fc.weight": (3, 8)}


# -- buffers and export's sub-graphs --------------------------------------------------------------


class Buffers(Base):
    """Buffers read in part (``pos[:, :s]``, HF's ``position_ids``; ``scale[:, :4]``), an unused
    buffer, and a block under ``torch.no_grad()`` that export wraps in ``wrap_with_set_grad_enabled``
    (as HF's rotary tables)."""

    def __init__(self, export):
        super().__init__(export)
        self.register_buffer("pos", torch.arange(32)[None])
        self.register_buffer("scale", torch.rand(1, 10))
        self.register_buffer("unused", torch.ones(7))
        self.register_buffer("freq", torch.rand(8))
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 3)

    def forward(self, x):
        x = self.branch(x)
        table = torch.cos(self.pos[:, : x.shape[1], None].float() * self.freq)  # (1, s, 8)
        h = self.fc1(x * table) + self.scale[:, :4].mean()  # entries 4.. of ``scale`` are never read
        with torch.no_grad():
            h = torch.relu(h)  # channels pass through the sub-graph
        return self.fc2(h)


@FRONT_ENDS
def test_buffers_form_no_groups_and_sub_graphs_are_entered(export):
    model, x = Buffers(export).eval(), torch.randn(2, 5, 8)
    graph = surgery.trace(model, x)
    if export:
        assert any("wrap_with_set_grad_enabled" in str(n.target) for n in graph.fx_graph.nodes)
    prunable = [g for g in graph.groups if g.prunable]
    assert [sorted(m.name for m in g.members) for g in prunable] == [["fc1.bias", "fc1.weight", "fc2.weight"]]
    for g in graph.groups:
        assert not {m.name for m in g.members} & {"pos", "scale", "unused"} or not g.prunable
    _, pruned, _ = check_pruned_equals_masked(model, x, "group-l1", 0.5, output="graph")
    assert pruned.state_dict()["pos"].shape == (1, 32) and pruned.state_dict()["scale"].shape == (1, 10)
    assert pruned(torch.randn(3, 20, 8)).shape == (3, 20, 3)  # a longer input still reads its positions


# -- tiny Hugging Face models ----------------------------------------------------------------------

#: name -> (heads group size, query heads per unit, head_dim, intermediate, hidden)
HF_EXPECTED = {
    "llama": (2, 2, 16, 128, 64),
    "qwen3": (2, 2, 16, 128, 64),
    "gemma2": (2, 2, 16, 128, 64),
    "gpt2": (4, 1, 16, 128, 64),
    "bert": (4, 1, 16, 128, 64),
    "t5": (4, 1, 16, 128, 64),
    "vit": (4, 1, 16, 128, 64),
}


@pytest.mark.parametrize("name", list(HF_EXPECTED))
def test_hf_heads_mlp_and_hidden_prune(name):
    pytest.importorskip("transformers", reason="transformers is not installed")
    from hf_models import HF_MODELS, example_inputs

    model, x = HF_MODELS[name](), example_inputs(name)
    graph = surgery.trace(model, x)
    assert graph.frontend == "export"
    kv, per_unit, head_dim, inter, hidden = HF_EXPECTED[name]
    prunable = [g for g in graph.groups if g.prunable]
    heads = [g for g in prunable if g.size == kv and not g.cross_channel]
    assert heads, [str(g) for g in prunable]
    for g in heads:  # head_dim-wide atoms: every projection row of a head goes together (1: T5's bias)
        widths = {len(ix) for m in g.members for ix in m.index_map()}
        assert head_dim in widths and widths <= {1, head_dim, head_dim * per_unit, head_dim * 3}, widths
    assert any(g.size == inter for g in prunable)
    [hid] = [g for g in prunable if g.size == hidden and g.cross_channel]
    tables = {n.args[0].target for n in graph.fx_graph.nodes
              if n.target is aten.embedding.default and n.args[0].meta["val"].shape[1] == hidden}
    assert tables or name == "vit"  # the token embedding (tied: read once, as lm_head.weight) is in it
    assert {(t, 1) for t in tables} <= {(m.name, m.dim) for m in hid.members}

    plan = plan_from_graph(model, graph, "group-l1", 0.5, skip_cross_channel=True)
    assert {gp.id for gp in plan.groups} >= {g.id for g in heads}
    pruned, masked = apply_to_graph(graph, plan, "prune", "graph"), apply_to_graph(graph, plan, "mask", "graph")
    other = example_inputs(name, batch=2, seq=11, seed=1)
    with torch.no_grad():
        for a, b in zip(output_tensors(pruned(*x)), output_tensors(masked(*x)), strict=True):
            assert rel_err(a, b) < 1e-4
        want = [t.shape for t in output_tensors(model(*other))]
        assert [t.shape for t in output_tensors(pruned(*other))] == want
        everything = plan_from_graph(model, graph, "group-l1", 0.5)
        assert hid.id in {gp.id for gp in everything.groups}
        smaller = apply_to_graph(graph, everything, "prune", "graph")
        assert [t.shape for t in output_tensors(smaller(*other))] == want
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in pruned.parameters())


def test_hf_kv_cache_is_off_while_tracing():
    """``use_cache=True`` returns a ``DynamicCache`` that export cannot output: the trace runs with the
    cache off and the user's config keeps its setting."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    from hf_models import example_inputs, tiny_llama

    model = tiny_llama()
    model.config.use_cache = True
    graph = surgery.trace(model, example_inputs("llama"))
    assert graph.frontend == "export" and model.config.use_cache is True
    assert any(g.prunable and g.size == 2 for g in graph.groups)  # the KV-head groups
