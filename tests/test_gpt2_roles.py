"""GPT-2's ``Conv1D`` (``addmm`` with an (in, out) weight) is a linear layer to every weight-based method."""

from __future__ import annotations

import pytest
import torch

import surgery
from surgery.roles import consumers, producers

from helpers import check_pruned_equals_masked

pytest.importorskip("transformers", reason="GPT-2 comes from transformers (pip install -e '.[hf]')")
from hf_models import example_inputs, tiny_gpt2  # noqa: E402


def test_addmm_sites_produce_and_consume_with_transposed_dims():
    model, x = tiny_gpt2(), example_inputs("gpt2")
    graph = surgery.trace(model, x)
    mlp = next(g for g in graph.groups if g.prunable and any(s.owner == "transformer.h.0.mlp.c_fc"
                                                              for s, _ in producers(graph, g)))
    (site, member), = producers(graph, mlp)
    assert (site.kind, site.out_dim, member.dim) == ("linearT", 1, 1)
    assert [(s.owner, s.in_dim, m.dim) for s, m in consumers(graph, mlp)] == [("transformer.h.0.mlp.c_proj", 0, 0)]


@pytest.mark.parametrize("method", ["l1", "l2"])
def test_faithful_l1_scores_gpt2_filters(method):
    model, x = tiny_gpt2(), example_inputs("gpt2")
    plan, _, _ = check_pruned_equals_masked(model, x, method=method, ratio=0.5, output="graph")
    w = model.transformer.h[0].mlp.c_fc.weight.detach()  # (in, out): a neuron's filter is a column
    norms = w.abs().sum(0) if method == "l1" else w.pow(2).sum(0).sqrt()
    kept = sorted(norms.argsort(descending=True)[: w.shape[1] - int(0.5 * w.shape[1])].tolist())
    assert any(sorted(g.keep) == kept for g in plan.groups if g.size == w.shape[1])


def test_gpt2_with_heads_pruned_stays_gpt2():
    """Heads pruned, hidden kept: GPT2Config cannot say so (head_dim = n_embd / n_head), but the model runs."""
    model, x = tiny_gpt2(), example_inputs("gpt2")
    plan = surgery.plan(model, x, method="l1", ratio=0.5, skip_cross_channel=True)
    heads = [g for g in plan.groups if g.size == model.config.n_head]
    assert heads and all(len(g.keep) == model.config.n_head // 2 for g in heads)
    with pytest.warns(UserWarning, match="cannot hold this pruned model"):
        pruned = surgery.apply(model, plan, output="module")
    masked = surgery.apply(model, plan, mode="mask")
    assert type(pruned) is type(model)
    c_attn, head_dim = pruned.transformer.h[0].attn.c_attn, model.config.n_embd // model.config.n_head
    assert c_attn.nf == c_attn.weight.shape[1] == 3 * (model.config.n_head // 2) * head_dim
    with torch.no_grad():
        for b, s in ((1, 8), (2, 11)):
            ids = example_inputs("gpt2", batch=b, seq=s)[0]
            a, m = pruned(ids).logits, masked(ids).logits
            assert a.shape == m.shape and (a - m).abs().max() / m.abs().max() < 1e-4
        out = pruned.generate(x[0][:, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
