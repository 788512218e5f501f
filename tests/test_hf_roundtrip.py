"""Every tiny Hugging Face model, pruned everywhere a config has a width (heads, KV heads, MLP, hidden),
stays its own class with a stock config: the pruned module computes what the pruned graph computes,
``save_pretrained`` -> ``from_pretrained`` gives identical logits at other batch sizes and lengths,
``generate`` runs. Where the class ties widths together (BERT/ViT/GPT-2: head size = hidden / heads;
Llama/Gemma2: hidden a multiple of heads; BERT's pooler is hidden wide) the plan is fitted to them;
a width no config names is left whole with the reason; Gemma's sqrt(hidden) embedding factor is
folded into an untied table and, tied, makes ``save_pretrained`` refuse (``save_pruned`` keeps it)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="surgery[hf] extra (transformers) not installed")

import surgery  # noqa: E402
from surgery.hf import NonUniformWidths  # noqa: E402
from surgery.pipeline import run  # noqa: E402
from surgery.rewrite import apply_to_graph  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_models import HF_MODELS, example_inputs, tiny_gemma2  # noqa: E402

#: config names of (hidden, heads, intermediate) per tiny model
NAMES = {
    "llama": ("hidden_size", "num_attention_heads", "intermediate_size"),
    "qwen3": ("hidden_size", "num_attention_heads", "intermediate_size"),
    "gemma2": ("hidden_size", "num_attention_heads", "intermediate_size"),
    "gpt2": ("n_embd", "n_head", "n_inner"),
    "bert": ("hidden_size", "num_attention_heads", "intermediate_size"),
    "t5": ("d_model", "num_heads", "d_ff"),
    "vit": ("hidden_size", "num_attention_heads", "intermediate_size"),
}
CAUSAL = ("llama", "qwen3", "gemma2", "gpt2")


def _build(name):
    # Gemma2's embedding factor is derived from the hidden size: untied, it is folded into the table
    return tiny_gemma2(tie_word_embeddings=False) if name == "gemma2" else HF_MODELS[name]()


def _prune(model, x, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run(model, x, "l1", 0.5, policy="uniform", **options)
    return res, [str(w.message) for w in caught if "surgery" in str(w.message)]


def _first(out):
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("name", list(NAMES))
def test_pruned_everywhere_stays_hf_and_round_trips(name, tmp_path):
    model, x = _build(name), example_inputs(name)
    res, warned = _prune(model, x)
    out, cfg = res.model, res.model.config
    assert type(out) is type(model) and not warned, warned
    hidden, heads, inter = (getattr(cfg, n) for n in NAMES[name])
    assert hidden < 64 and heads < 4 and inter < 128  # every kind of width went down
    if hasattr(cfg, "num_key_value_heads"):
        assert cfg.num_key_value_heads == 1 and heads == 2  # a KV head goes with its query group
    if name in ("bert", "vit", "gpt2"):
        assert hidden == heads * 16  # the head size stays hidden / heads
    if name in ("llama", "gemma2"):
        assert hidden % heads == 0  # their configs require it
    assert getattr(model.config, NAMES[name][0]) == 64  # the user's config is untouched
    graph = apply_to_graph(res.graph, res.plan, "prune", "graph")
    with torch.no_grad():
        assert torch.allclose(_first(out(*x)), _first(graph(*x)), atol=1e-5)

    out.save_pretrained(tmp_path)
    again = type(out).from_pretrained(tmp_path).eval()
    for batch, seq in ((1, 8), (2, 5), (3, 11)):
        ids = example_inputs(name, batch=batch, seq=seq, seed=batch)
        with torch.no_grad():
            got, want = _first(again(*ids)), _first(out(*ids))
        assert got.shape == _first(model(*ids)).shape and torch.equal(got, want)
    if name in CAUSAL:
        ids = example_inputs(name, batch=2, seq=6, seed=7)[0]
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(again.generate(ids, **kw), out.generate(ids, **kw))


def test_bert_pooler_follows_the_hidden_size():
    """BertConfig sizes the pooler by hidden_size: its group is pruned to the hidden width, not by
    its own ratio (and not left at 64, which no config could reload)."""
    model, x = HF_MODELS["bert"](), example_inputs("bert")
    res, _ = _prune(model, x)
    pooler = res.model.bert.pooler.dense
    assert pooler.in_features == pooler.out_features == res.model.config.hidden_size
    assert res.model.classifier.in_features == res.model.config.hidden_size


def test_a_width_no_config_names_is_left_whole_with_the_reason():
    """A head of the user's own on top of an HF model: a stock config could not rebuild it pruned."""
    model, x = HF_MODELS["vit"](), example_inputs("vit")
    model.classifier = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    res, _ = _prune(model, x)
    [gid] = [gid for gid, why in res.plan.notes.items() if "ViTConfig has no width for these channels" in why]
    assert res.graph.groups[gid].size == 32 and gid not in {gp.id for gp in res.plan.groups}
    assert res.model.classifier[0].out_features == 32


def test_tied_gemma_embedding_factor_refuses_save_pretrained_and_save_pruned_keeps_it(tmp_path):
    model, x = tiny_gemma2(), example_inputs("gemma2")  # tie_word_embeddings=True
    res, warned = _prune(model, x)
    out = res.model
    reason = "multiplies its token embeddings by sqrt(hidden_size) (8; the pruned hidden size gives 6)"
    assert any(reason in w for w in warned)
    assert float(out.model.embed_tokens.embed_scale) == 8.0  # the factor the model was trained with
    graph = apply_to_graph(res.graph, res.plan, "prune", "graph")
    with torch.no_grad():
        assert torch.allclose(out(*x).logits, graph(*x)[0], atol=1e-5)
    with pytest.raises(NonUniformWidths, match="ties them to the output layer"):
        out.save_pretrained(tmp_path)
    surgery.hf.save_pruned(out, tmp_path)
    again = surgery.hf.load_pruned(tmp_path)
    assert float(again.model.embed_tokens.embed_scale) == 8.0
    ids = example_inputs("gemma2", batch=2, seq=9, seed=4)[0]
    with torch.no_grad():
        assert torch.equal(again(ids).logits, out(ids).logits)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_surgery_save_keeps_the_hf_class(name, tmp_path):
    """``surgery.save`` of a pruned HF model: the class tree (config and generation config included)
    and the exported graph (with the sub-graph of its rotary tables where the transformers version
    exports one, ``wrap_with_set_grad_enabled``) both come back and compute the pruned model's logits."""
    model, x = _build(name), example_inputs(name)
    res, _ = _prune(model, x)
    path = tmp_path / "p.pt"
    surgery.save(res.model, path)
    own, graph = surgery.load(path), surgery.load(path, output="graph")
    assert type(own) is type(model) and isinstance(graph, torch.fx.GraphModule)
    traced_subgraphs = any(isinstance(m, torch.fx.GraphModule) for m in res.graph.gm.children())
    assert any(isinstance(m, torch.fx.GraphModule) for m in graph.children()) == traced_subgraphs
    ids = example_inputs(name, batch=2, seq=8, seed=3)
    with torch.no_grad():
        want = res.model(*ids).logits
        assert torch.equal(own(*ids).logits, want)
        assert torch.allclose(_first(graph(*example_inputs(name))), res.model(*example_inputs(name)).logits, atol=1e-6)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(own.generate(ids[0], **kw), res.model.generate(ids[0], **kw))  # its generation config came back


def test_load_pruned_restores_tensors_shared_between_modules(tmp_path):
    """T5's encoder reads the same embedding module as ``shared``; save_pretrained stores one name.
    Widths that differ between blocks (only block 0 pruned) go through save_pruned / load_pruned."""
    model, x = HF_MODELS["t5"](), example_inputs("t5")
    res, warned = _prune(model, x, only_layers=["transformer.encoder.block.0.*"])
    assert any("widths differ between layers" in w for w in warned)
    surgery.hf.save_pruned(res.model, tmp_path)
    again = surgery.hf.load_pruned(tmp_path)
    assert again.transformer.encoder.embed_tokens.weight is again.transformer.shared.weight
    ids = example_inputs("t5", batch=2, seq=7, seed=6)[0]
    with torch.no_grad():
        assert torch.equal(again(ids).logits, res.model(ids).logits)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_gqa_query_option_keeps_kv_heads_and_round_trips(name, tmp_path):
    """``gqa="query"``: query heads go by position inside their KV group, so every group keeps as many
    (4 query heads over 2 KV heads -> 2 over 2); the config says so and the model reloads."""
    model, x = _build(name), example_inputs(name)
    res, warned = _prune(model, x, gqa="query", skip_cross_channel=True)
    out, cfg = res.model, res.model.config
    assert type(out) is type(model) and not warned and res.plan.options["gqa"] == "query"
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 2)
    assert out.model.layers[0].self_attn.num_key_value_groups == 1
    masked = apply_to_graph(res.graph, res.plan, "mask", "module", model)
    ids = example_inputs(name, batch=2, seq=9, seed=3)[0]
    with torch.no_grad():
        assert torch.allclose(out(ids).logits, masked(ids).logits, atol=1e-5)
    out.save_pretrained(tmp_path)
    again = type(out).from_pretrained(tmp_path).eval()
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, out(ids).logits)
    assert torch.equal(again.generate(ids, **kw), masked.generate(ids, **kw))
