"""A pruned Hugging Face model stays a Hugging Face model: its class, a config that describes it
(``save_pretrained`` -> ``from_pretrained`` gives identical logits), ``generate``, any batch size and
sequence length; per-layer widths are said and refused by ``save_pretrained``; perplexity and
``surgery eval``. Tiny random Llama (GQA) and GPT-2 from ``tests/hf_models.py``; each model is
pruned once per module (tracing through ``torch.export`` takes a few seconds)."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="surgery[hf] extra (transformers) not installed")

import surgery  # noqa: E402
from surgery.hf import NonUniformWidths, layer_widths, perplexity  # noqa: E402
from surgery.pipeline import run  # noqa: E402
from surgery.rewrite import apply_to_graph  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_models import example_inputs, tiny_gpt2, tiny_llama  # noqa: E402


def _run(model, x, method, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run(model, x, method, 0.5, **options)
    return res, [str(w.message) for w in caught if "surgery" in str(w.message)]


@pytest.fixture(scope="module")
def llama_uniform():
    model, x = tiny_llama(), example_inputs("llama")
    res, warned = _run(model, x, "l1", policy="uniform", round_to=8)  # hidden % heads == 0 (LlamaConfig checks it)
    return model, res, warned


@pytest.fixture(scope="module")
def llama_mlp_per_layer():
    """MLP neurons only (pruned == masked), 25% in layer 0 and 50% in layer 1: widths differ."""
    model, x = tiny_llama(), example_inputs("llama")
    res, warned = _run(model, x, "l1", only_layers=["*.mlp.gate_proj"],
                       layer_ratios={"model.layers.0.*": 0.25, "model.layers.1.*": 0.5})
    return model, res, warned


@pytest.fixture(scope="module")
def gpt2_mlp():
    model, x = tiny_gpt2(), example_inputs("gpt2")
    res, warned = _run(model, x, "group-l1", only_layers=["*.mlp.c_fc"], policy="uniform")
    return model, res, warned


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_llama_keeps_class_and_config_describes_it(llama_uniform):
    model, res, warned = llama_uniform
    out, cfg = res.model, res.model.config
    assert type(out) is transformers.LlamaForCausalLM and not warned and res.plan.groups
    layer = out.model.layers[1]
    assert cfg.intermediate_size == layer.mlp.gate_proj.out_features < 128
    assert cfg.hidden_size == out.model.embed_tokens.embedding_dim
    assert cfg.head_dim == 16 and layer.self_attn.head_dim == 16 and layer.self_attn.scaling == 16 ** -0.5
    assert cfg.num_attention_heads * 16 == layer.self_attn.q_proj.out_features
    assert cfg.num_key_value_heads * 16 == layer.self_attn.k_proj.out_features
    assert layer.self_attn.num_key_value_groups == cfg.num_attention_heads // cfg.num_key_value_heads
    assert len({tuple(w.items()) for w in layer_widths(out).values()}) == 1
    assert model.config.intermediate_size == 128  # the user's model and config are untouched


@pytest.mark.parametrize("case", ["llama_uniform", "gpt2_mlp"])
def test_save_pretrained_reload_identical_any_batch_and_length(case, request, tmp_path):
    _, res, _ = request.getfixturevalue(case)
    name = "llama" if case.startswith("llama") else "gpt2"
    res.model.save_pretrained(tmp_path)
    again = type(res.model).from_pretrained(tmp_path).eval()
    for batch, seq in ((1, 8), (2, 5), (3, 11)):
        ids = example_inputs(name, batch=batch, seq=seq, seed=batch)
        got, want = _logits(again, ids[0]), _logits(res.model, ids[0])
        assert got.shape == (batch, seq, 128) and torch.equal(got, want)
    assert again.config.to_dict()["intermediate_size" if name == "llama" else "n_inner"] < 128


@pytest.mark.parametrize("case", ["llama_mlp_per_layer", "gpt2_mlp"])
def test_generate_mlp_only_equals_masked(case, request):
    model, res, _ = request.getfixturevalue(case)
    name = "llama" if case.startswith("llama") else "gpt2"
    masked = apply_to_graph(res.graph, res.plan, "mask", "module", model)
    ids = example_inputs(name, batch=2, seq=6, seed=3)[0]
    assert torch.allclose(_logits(res.model, ids), _logits(masked, ids), atol=1e-5)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    got, want = res.model.generate(ids, **kw), masked.generate(ids, **kw)
    assert got.shape == (2, 10) and torch.equal(got, want)


def test_per_layer_widths_warn_and_save_pretrained_refuses(llama_mlp_per_layer, tmp_path):
    _, res, warned = llama_mlp_per_layer
    out = res.model
    assert type(out) is transformers.LlamaForCausalLM
    assert [layer.mlp.up_proj.out_features for layer in out.model.layers] == [96, 64]
    assert out.config.surgery_layer_widths["model.layers.1"]["intermediate"] == 64
    reason = "widths differ between layers (intermediate: 96, 64)"
    assert any(reason in w for w in warned)
    with pytest.raises(NonUniformWidths, match=r"^cannot save_pretrained: widths differ between layers "
                                               r"\(intermediate: 96, 64\); plan with policy='uniform'"):
        out.save_pretrained(tmp_path)
    assert list(tmp_path.iterdir()) == []
    surgery.hf.save_pruned(out, tmp_path)  # the documented alternative: per-layer widths in config.json
    again = surgery.hf.load_pruned(tmp_path)
    assert [layer.mlp.up_proj.out_features for layer in again.model.layers] == [96, 64]
    ids = example_inputs("llama", batch=2, seq=7, seed=5)[0]
    assert torch.equal(_logits(again, ids), _logits(out, ids))


def test_perplexity_sliding_windows_match_direct():
    model = tiny_llama()
    ids = torch.randint(0, 128, (70,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        windows = ids[:64].view(4, 16)
        logits = model(windows).logits
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, 128), windows[:, 1:].reshape(-1))
    assert perplexity(model, ids, seq_len=16) == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert perplexity(model, ids, seq_len=16, batch_size=1) == pytest.approx(math.exp(float(nll)), rel=1e-5)
    strided = perplexity(model, ids, seq_len=16, stride=8)  # each token once, with more context
    assert strided == pytest.approx(math.exp(float(nll)), rel=0.2) and strided != perplexity(model, ids, seq_len=16)


def test_cli_eval_saved_model_and_errors(tmp_path):
    from typer.testing import CliRunner

    from surgery.cli import app

    model = tiny_gpt2(vocab_size=300)
    model.save_pretrained(tmp_path)
    want = perplexity(model, "pydoc", seq_len=16, max_windows=3)
    r = CliRunner().invoke(app, ["eval", str(tmp_path), "--data", "pydoc", "--seq-len", "16", "--max-windows", "3"])
    assert r.exit_code == 0 and f"perplexity {want:.3f} on pydoc" in r.output
    r = CliRunner().invoke(app, ["eval", str(tmp_path), "--data", "digits"])
    assert r.exit_code == 1 and "error: --data must be 'pydoc' or a .txt file, got 'digits'" in r.output
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "empty")])
    assert r.exit_code == 1 and "needs a config.json (save_pretrained output)" in r.output


def test_bert_heads_with_hidden_kept_run_as_own_class_and_save_pruned_keeps_them(tmp_path):
    """BertConfig ties the head size to hidden_size / heads: two of four heads gone with the hidden
    size kept runs (attention attributes set from a config of its own widths) but has no stock config:
    save_pretrained refuses, save_pruned / load_pruned round-trip it."""
    from hf_models import tiny_bert

    model, x = tiny_bert(), example_inputs("bert")
    res, warned = _run(model, x, "group-l1", skip_cross_channel=True, only_layers=["*.attention.self.query"])
    out = res.model
    assert type(out) is transformers.BertForSequenceClassification
    attn = out.bert.encoder.layer[0].attention.self
    assert (attn.num_attention_heads, attn.attention_head_size, attn.all_head_size) == (2, 16, 32)
    masked = apply_to_graph(res.graph, res.plan, "mask", "module", model)
    ids = example_inputs("bert", batch=2, seq=9, seed=2)[0]
    with torch.no_grad():
        assert torch.allclose(out(ids).logits, masked(ids).logits, atol=1e-5)
    reason = "this config ties head_dim to hidden_size / heads (64 / 2 != 16)"
    assert any(reason in w for w in warned)
    with pytest.raises(NonUniformWidths, match=r"the module runs as it is: use surgery.hf.save_pruned\(model, path\) "
                                               r"and surgery.hf.load_pruned\(path\)$"):
        out.save_pretrained(tmp_path)
    assert list(tmp_path.iterdir()) == []
    surgery.hf.save_pruned(out, tmp_path)
    again = surgery.hf.load_pruned(tmp_path)
    attn = again.bert.encoder.layer[1].attention.self
    assert type(again) is type(out) and (attn.num_attention_heads, attn.attention_head_size, attn.all_head_size) == (2, 16, 32)
    for batch, seq in ((2, 9), (1, 13)):
        ids = example_inputs("bert", batch=batch, seq=seq, seed=batch)[0]
        with torch.no_grad():
            assert torch.equal(again(ids).logits, out(ids).logits)
    # surgery.save keeps the class too; the rebuilt model refuses save_pretrained for the same reason
    surgery.save(out, tmp_path / "p.pt")
    back = surgery.load(tmp_path / "p.pt")
    assert type(back) is type(out)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, out(ids).logits)
    with pytest.raises(NonUniformWidths, match="this config ties head_dim to hidden_size / heads"):
        back.save_pretrained(tmp_path / "again")


def test_cli_prune_model_directory_with_text_data(tmp_path):
    from typer.testing import CliRunner

    from surgery.cli import app

    src, out = tmp_path / "src", tmp_path / "out"
    tiny_llama(vocab_size=300).save_pretrained(src)
    r = CliRunner().invoke(app, ["prune", str(src), "--method", "wanda-structured", "--ratio", "0.5", "--data", "pydoc",
                                 "--input-shape", "2,16", "--calib-batches", "2",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "result: LlamaForCausalLM" in r.output
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert again.config.intermediate_size == 64 and again.model.layers[0].mlp.up_proj.out_features == 64
    r = CliRunner().invoke(app, ["eval", str(out), "--seq-len", "16", "--max-windows", "2"])
    assert r.exit_code == 0 and "perplexity" in r.output
    bad = CliRunner().invoke(app, ["prune", "torchvision:resnet18", "--method", "wanda-structured", "--data", "pydoc"])
    assert bad.exit_code == 1 and "error: text --data pydoc needs a language model (a save_pretrained directory)" in bad.output
