"""FLAP's bias compensation on consumers without a bias (Llama's ``o_proj`` / ``down_proj``): they are
given one holding the removed channels' mean contribution, as FLAP's code does.

Checked on a tiny random Llama pruned with flap on the ``pydoc`` text (heads and MLP neurons, the
same widths in every layer): each compensated projection's output mean over the calibration tokens
equals the unpruned one's (an attention head is compensated column by column, with ``head_dim``
means), the result stays a ``LlamaForCausalLM`` whose config sets ``attention_bias`` / ``mlp_bias``
(the sibling projections get exact zero biases) and round-trips through ``save_pretrained`` /
``from_pretrained``, pruned == masked, the ``GraphModule`` result passes the new bias to its
``aten.linear`` calls, and the plan (per-column means) round-trips through JSON. GPT-2's ``Conv1D``
(an ``addmm`` with a bias) is compensated too; a conv consumer is not, and the plan says why."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers", reason="surgery[hf] extra (transformers) not installed")

import surgery  # noqa: E402
from surgery.calibration.text import text_calibration  # noqa: E402
from surgery.errors import RewriteError  # noqa: E402
from surgery.module_tree import output_tensors  # noqa: E402
from surgery.pipeline import run  # noqa: E402
from surgery.rewrite import apply_to_graph  # noqa: E402
from surgery.roles import consumers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_models import tiny_gpt2, tiny_llama  # noqa: E402

VOCAB = 300  # a byte-level tokenizer's vocabulary fits
HEADS = "*.self_attn.q_proj"


def _ids(batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _run(model, method="flap", **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run(model, _ids(), method, 0.5, "pydoc", **options)
    return res, [str(w.message) for w in caught if "surgery" in str(w.message)]


@pytest.fixture(scope="module")
def llama():
    """Heads (one of two KV groups per layer) and MLP neurons, uniform widths."""
    model = tiny_llama(vocab_size=VOCAB)
    res, warned = _run(model, policy="uniform", only_layers=[HEADS, "*.mlp.gate_proj"], layer_ratios={HEADS: 0.5})
    return model, res, warned


def _inputs_of(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """What each named linear reads over every calibration token of the flap run: (tokens, in), float64."""
    seen: dict[str, list] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, _, n=n: seen[n].append(a[0].detach()))
             for n in names]
    try:
        with torch.no_grad():
            for ids, _ in text_calibration("pydoc", model, (_ids(),)):
                model(ids)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat([a.reshape(-1, a.shape[-1]) for a in v]).double() for n, v in seen.items()}


def _kept_columns(res, owner: str) -> torch.Tensor:
    """The input columns of consumer ``owner`` that its group keeps (a head keeps all of its own)."""
    for gp in res.plan.groups:
        for site, member in consumers(res.graph, res.graph.groups[gp.id]):
            if site.owner == owner:
                lists = member.index_map()
                return torch.tensor(sorted(i for u in gp.keep for i in lists[u]))
    raise AssertionError(f"{owner} consumes no pruned group")


def _output_mean(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens of ``linear(x)`` in float64 (``nn.Linear`` or GPT-2's ``Conv1D``)."""
    w = linear.weight.detach().double()
    w = w.T if type(linear).__name__ == "Conv1D" else w
    b = linear.bias.detach().double() if linear.bias is not None else None
    return F.linear(x, w, b).mean(0)


LLAMA_CONSUMERS = [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.o_proj", "mlp.down_proj")]


def test_llama_compensation_keeps_each_consumers_output_mean(llama):
    model, res, _ = llama
    assert len(res.plan.groups) == 4 and not res.plan.notes
    heads = [gp for gp in res.plan.groups if gp.label.endswith("q_proj (+3)")]
    assert [len(gp.keep) for gp in heads] == [1, 1]
    assert all(isinstance(v, tuple) and len(v) == 32 for gp in heads for _, v in gp.shift)  # 2 query heads x head_dim 16
    x = _inputs_of(model, LLAMA_CONSUMERS)
    for name in LLAMA_CONSUMERS:
        full = _output_mean(model.get_submodule(name), x[name])
        pruned = _output_mean(res.model.get_submodule(name), x[name][:, _kept_columns(res, name)])
        assert torch.allclose(pruned, full, rtol=0, atol=1e-6), name
    # without the compensation the means move: the check above is not vacuous
    plain = surgery.prune(model, _ids(), method="flap", ratio=0.5, data="pydoc", policy="uniform", compensate=False,
                          only_layers=[HEADS, "*.mlp.gate_proj"], layer_ratios={HEADS: 0.5})
    name = LLAMA_CONSUMERS[0]
    moved = _output_mean(plain.get_submodule(name), x[name][:, _kept_columns(res, name)])
    assert plain.get_submodule(name).bias is None
    assert float((moved - _output_mean(model.get_submodule(name), x[name])).abs().max()) > 1e-3


def test_llama_keeps_class_config_flags_and_round_trips(llama, tmp_path):
    model, res, warned = llama
    out, cfg = res.model, res.model.config
    assert type(out) is transformers.LlamaForCausalLM and not warned
    assert cfg.attention_bias is True and cfg.mlp_bias is True
    assert model.config.attention_bias is False and model.config.mlp_bias is False  # the user's config
    assert model.model.layers[0].self_attn.o_proj.bias is None  # and model are untouched
    for layer in out.model.layers:
        for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj):
            assert m.bias.shape == (m.out_features,) and not m.bias.any()  # exact zeros: outputs unchanged
        assert layer.self_attn.o_proj.bias.any() and layer.mlp.down_proj.bias.any()
    out.save_pretrained(tmp_path)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.attention_bias is True and again.config.mlp_bias is True
    for batch, seq in ((1, 8), (2, 16), (3, 5)):
        ids = _ids(batch, seq, seed=batch)
        with torch.no_grad():
            assert torch.equal(again(ids).logits, out(ids).logits)


def test_llama_pruned_equals_masked_and_graph_result(llama):
    model, res, _ = llama
    masked = apply_to_graph(res.graph, res.plan, "mask", "module", model)
    graph = apply_to_graph(res.graph, res.plan, "prune", "graph", model)
    masked_graph = apply_to_graph(res.graph, res.plan, "mask", "graph", model)
    assert masked.model.layers[0].mlp.down_proj.bias.shape == (64,) and model.model.layers[0].mlp.down_proj.bias is None
    targets = {n.target for n in graph.graph.nodes if n.op == "get_attr"}
    assert {f"{name}.bias" for name in LLAMA_CONSUMERS} <= targets
    ids = _ids(2, 16, seed=5)
    with torch.no_grad():
        want = res.model(ids).logits
        err = float((masked(ids).logits - want).norm() / want.norm())
        (got,) = [t for t in output_tensors(graph(ids)) if t.shape == want.shape]
        (got_masked,) = [t for t in output_tensors(masked_graph(ids)) if t.shape == want.shape]
    assert err < 1e-4
    assert torch.allclose(got, want, rtol=0, atol=1e-5) and torch.allclose(got_masked, want, rtol=0, atol=1e-5)


def test_plan_with_per_column_means_round_trips_and_replays(llama):
    model, res, _ = llama
    again = surgery.Plan.from_json(res.plan.to_json())
    assert [gp.shift for gp in again.groups] == [gp.shift for gp in res.plan.groups]
    replayed = surgery.apply(model, again)
    ids = _ids(1, 8, seed=7)
    with torch.no_grad():
        assert torch.equal(replayed(ids).logits, res.model(ids).logits)


def test_rewrite_refuses_means_that_do_not_fit_the_columns(llama):
    model, res, _ = llama
    d = res.plan.to_dict()
    head = next(g for g in d["groups"] if g["label"].endswith("q_proj (+3)"))
    head["shift"] = [[c, v[:3]] for c, v in head["shift"]]
    bad = surgery.Plan.from_dict(d)
    with pytest.raises(RewriteError, match=rf"^cannot compensate group {head['id']} into model\.layers\.\d\.self_attn\.o_proj: "
                                           r"channel 0 has 3 means for 32 input columns$"):
        apply_to_graph(res.graph, bad, "prune", "graph", model)


def test_gpt2_conv1d_consumer_is_compensated():
    model = tiny_gpt2(vocab_size=VOCAB)
    res, _ = _run(model, only_layers=["*.mlp.c_fc"], policy="uniform")
    assert len(res.plan.groups) == 2 and all(gp.shift for gp in res.plan.groups) and not res.plan.notes
    names = [f"transformer.h.{i}.mlp.c_proj" for i in range(2)]
    x = _inputs_of(model, names)
    for name in names:
        full = _output_mean(model.get_submodule(name), x[name])
        pruned = _output_mean(res.model.get_submodule(name), x[name][:, _kept_columns(res, name)])
        assert torch.allclose(pruned, full, rtol=0, atol=1e-6), name


def test_conv_consumer_is_not_compensated_and_the_plan_says_why():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(2, 3, 8, 8)
    data = [(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)), None) for i in range(2)]
    p = surgery.plan(net, x, method="flap", ratio=0.5, data=data)
    (gp,) = p.groups
    assert gp.shift == ()
    assert p.notes[gp.id] == "pruned without bias compensation: 2 is a conv, not a linear (a constant input does not give it a constant output)"


def test_head_score_sums_its_columns_fluctuation(llama):
    """FLAP scores a head by the sum over its ``head_dim`` output-projection columns of
    Var(X_j) * ||W_{:, j}||^2 (not the head's pooled variance times its columns' norm)."""
    from surgery.calibration import Calibration
    from surgery.methods import ScoreContext, get_method

    model, res, _ = llama
    owner = "model.layers.0.self_attn.o_proj"
    [(gid, member)] = [(g.id, m) for g in res.graph.groups for site, m in consumers(res.graph, g)
                       if site.owner == owner and g.prunable]
    method = get_method("flap")
    ctx = ScoreContext(model, res.graph, [res.graph.groups[gid]], Calibration(text_calibration("pydoc", model, (_ids(),))))
    got = method.fn(ctx, **method.resolve()).scores[gid]
    x = _inputs_of(model, [owner])[owner]
    w = model.get_submodule(owner).weight.detach().double()
    per_column = x.var(0, unbiased=False) * w.square().sum(0)
    want = [float(per_column[cols].sum()) for cols in member.index_map()]
    pooled = [float(x[:, cols].var(unbiased=False) * w[:, cols].square().sum()) for cols in member.index_map()]
    assert got.tolist() == pytest.approx(want, rel=1e-6) and got.tolist() != pytest.approx(pooled, rel=1e-3)
