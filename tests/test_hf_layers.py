"""Depth pruning of Hugging Face models (``surgery.hf.remove_layers``) and ShortGPT block influence
(``surgery.hf.layer_importance``) on the tiny random models of ``tests/hf_models.py``.

The reference for "block k removed" is the *original* model with block k's forward patched to hand
its input hidden states on unchanged (in the block's own return format: a tensor for Llama-style
layers and GPT-2, ``(hidden, position_bias, cross_bias)`` for T5, whose first block still supplies
the stack's relative position bias), so it does not rely on the renumbering under test."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="surgery[hf] extra (transformers) not installed")

from surgery.errors import PlanError, SurgeryError  # noqa: E402
from surgery.hf import NonUniformWidths, layer_importance, load_pruned, remove_layers, save_pruned  # noqa: E402
from surgery.pipeline import run  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_models import example_inputs, tiny_bert, tiny_gemma2, tiny_gpt2, tiny_llama, tiny_qwen3, tiny_t5, tiny_vit  # noqa: E402

# Gemma2 with a window shorter than the test sequences, so a wrongly sliced ``layer_types`` changes logits
BUILDERS = {
    "llama": lambda: tiny_llama(num_hidden_layers=3),
    "qwen3": lambda: tiny_qwen3(num_hidden_layers=4, use_sliding_window=True, sliding_window=4, max_window_layers=2),
    "gemma2": lambda: tiny_gemma2(num_hidden_layers=4, sliding_window=4),
    "gpt2": lambda: tiny_gpt2(n_layer=3),
    "t5": lambda: tiny_t5(num_layers=3),
    "bert": lambda: tiny_bert(num_hidden_layers=3),
    "vit": lambda: tiny_vit(num_hidden_layers=3),
}
DECODERS = ("llama", "qwen3", "gemma2", "gpt2")
STACK = {"llama": "model.layers", "qwen3": "model.layers", "gemma2": "model.layers", "gpt2": "transformer.h",
         "t5": "transformer.encoder.block", "bert": "bert.encoder.layer", "vit": "vit.layers"}


def _inputs(name, batch=2, seq=12):
    return example_inputs(name, batch=batch, seq=seq)


def _logits(model, *args, **kwargs):
    with torch.no_grad():
        return model(*args, **kwargs).logits


def _skipping(model, blocks: list[str]):
    """A copy of ``model`` whose named blocks pass their input hidden states through unchanged."""
    ref = copy.deepcopy(model)
    for name in blocks:
        block = ref.get_submodule(name)
        original = block.forward

        def forward(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden
        block.forward = forward
    return ref


def _layer_idx(model):
    return [m.layer_idx for m in model.modules() if hasattr(m, "layer_idx")]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config.to_dict(), _layer_idx(model)


@pytest.mark.parametrize("name,drop", [
    ("llama", [1]), ("llama", [0, -1]), ("qwen3", [0]), ("qwen3", [2]), ("gemma2", [0]), ("gemma2", [1, 2]),
    ("gpt2", [0]), ("t5", [0]), ("t5", [1, 2]), ("bert", [1]), ("vit", [0]),
])
def test_removed_block_computes_as_skipped_block(name, drop):
    model = BUILDERS[name]()
    n = len(model.get_submodule(STACK[name]))
    pruned = remove_layers(model, drop)
    ref = _skipping(model, [f"{STACK[name]}.{i % n}" for i in drop])
    x = _inputs(name)
    assert len(pruned.get_submodule(STACK[name])) == n - len(drop)
    torch.testing.assert_close(_logits(pruned, *x), _logits(ref, *x), atol=1e-5, rtol=0)


def test_gemma2_layer_types_sliced_layer_idx_renumbered_user_model_untouched():
    model = BUILDERS["gemma2"]()
    before = _snapshot(model)
    assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    pruned = remove_layers(model, [0, 3])
    assert type(pruned) is type(model)
    assert pruned.config.layer_types == ["full_attention", "sliding_attention"]
    assert pruned.config.num_hidden_layers == 2
    assert _layer_idx(pruned) == [0, 1]
    assert [layer.self_attn.sliding_window for layer in pruned.model.layers] == [None, 4]
    state, config, idx = before
    assert model.config.to_dict() == config and _layer_idx(model) == idx == [0, 1, 2, 3]
    assert len(model.model.layers) == 4
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and set(state) == set(model.state_dict())


def test_qwen3_window_boundary_moves_with_the_removed_layers():
    model = BUILDERS["qwen3"]()
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    pruned = remove_layers(model, "model.layers.1")
    assert pruned.config.max_window_layers == 1
    assert pruned.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    # the config is consistent: rebuilding layer_types from the boundary gives the sliced list
    rebuilt = transformers.Qwen3Config(**{**pruned.config.to_dict(), "layer_types": None})
    assert rebuilt.layer_types == pruned.config.layer_types


@pytest.mark.parametrize("name,count", [("llama", "num_hidden_layers"), ("gpt2", "n_layer"), ("t5", "num_layers")])
def test_layer_count_written_under_the_configs_own_name(name, count):
    pruned = remove_layers(BUILDERS[name](), [-1])
    assert pruned.config.to_dict()[count] == 2
    assert _layer_idx(pruned) == [0, 1]
    if name == "t5":  # T5's stack holds a private copy of the config
        assert pruned.transformer.encoder.config.num_layers == 2


def test_t5_first_block_hands_its_position_bias_on():
    model = BUILDERS["t5"]()
    pruned = remove_layers(model, [0])
    attn = pruned.transformer.encoder.block[0].layer[0].SelfAttention
    assert attn.has_relative_attention_bias
    torch.testing.assert_close(attn.relative_attention_bias.weight,
                               model.transformer.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight, atol=0, rtol=0)
    assert not hasattr(pruned.transformer.encoder.block[1].layer[0].SelfAttention, "relative_attention_bias")


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma2", "gpt2", "t5"])
def test_save_pretrained_round_trip(name, tmp_path):
    pruned = remove_layers(BUILDERS[name](), [0])
    pruned.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = type(pruned).from_pretrained(tmp_path).eval()
    differs = {k for k, v in loaded.config.to_dict().items() if pruned.config.to_dict().get(k) != v}
    assert differs == {"_name_or_path"}  # the count, layer_types, max_window_layers... all as written
    for batch, seq in ((2, 12), (3, 7)):
        x = _inputs(name, batch, seq)
        torch.testing.assert_close(_logits(loaded, *x), _logits(pruned, *x), atol=0, rtol=0)


def _generate(model, ids, use_cache):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=use_cache, pad_token_id=0)


@pytest.mark.parametrize("name", DECODERS)
def test_generate_with_kv_cache_after_reload(name, tmp_path):
    """The KV cache is indexed by ``layer_idx`` (and its per-layer kinds by ``layer_types``): the
    reloaded model must generate the same tokens with the cache as without it."""
    pruned = remove_layers(BUILDERS[name](), [0])
    pruned.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = type(pruned).from_pretrained(tmp_path).eval()
    ids = _inputs(name, 2, 6)[0]
    cached = _generate(loaded, ids, True)
    assert cached.shape == (2, 14)
    assert torch.equal(cached, _generate(loaded, ids, False))
    assert torch.equal(cached, _generate(pruned, ids, True))


def _tiny_t5_seq2seq():
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
                                relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg).eval()


def test_t5_encoder_decoder_blocks_named_by_stack(tmp_path):
    model = _tiny_t5_seq2seq()
    pruned = remove_layers(model, ["encoder.block.0", "decoder.block.1"])
    assert (pruned.config.num_layers, pruned.config.num_decoder_layers) == (2, 2)
    assert (pruned.encoder.config.num_layers, pruned.decoder.config.num_layers) == (2, 2)
    assert _layer_idx(pruned.decoder) == [0, 0, 1, 1]  # self- and cross-attention of each block
    ids = _inputs("t5", 2, 9)[0]
    dec = _inputs("t5", 2, 5)[0]
    ref = _skipping(model, ["encoder.block.0", "decoder.block.1"])
    torch.testing.assert_close(_logits(pruned, ids, decoder_input_ids=dec), _logits(ref, ids, decoder_input_ids=dec), atol=1e-5, rtol=0)
    pruned.save_pretrained(tmp_path)
    loaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert torch.equal(_generate(loaded, ids, True), _generate(loaded, ids, False))


def test_per_layer_pruned_model_keeps_its_widths_under_the_new_names(tmp_path):
    model, x = BUILDERS["llama"](), example_inputs("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = run(model, x, "l1", 0.5, only_layers=["*.mlp.gate_proj"],
                     layer_ratios={"model.layers.0.*": 0.25, "model.layers.1.*": 0.5, "model.layers.2.*": 0.75}).model
    shallow = remove_layers(pruned, [1])
    assert shallow.config.surgery_layer_widths == {"model.layers.0": {"heads": 4, "kv_heads": 2, "intermediate": 96},
                                                   "model.layers.1": {"heads": 4, "kv_heads": 2, "intermediate": 32}}
    with pytest.raises(NonUniformWidths) as err:
        shallow.save_pretrained(tmp_path)
    assert str(err.value) == ("cannot save_pretrained: widths differ between layers (intermediate: 96, 32); plan with "
                              "policy='uniform', or use surgery.hf.save_pruned(model, path) and surgery.hf.load_pruned(path)")
    xs = _inputs("llama")
    torch.testing.assert_close(_logits(shallow, *xs), _logits(_skipping(pruned, ["model.layers.1"]), *xs), atol=1e-5, rtol=0)
    save_pruned(shallow, str(tmp_path))
    torch.testing.assert_close(_logits(load_pruned(str(tmp_path)), *xs), _logits(shallow, *xs), atol=0, rtol=0)


def test_gpt2_inverse_layer_idx_scaling_refuses_renumbering():
    model = tiny_gpt2(n_layer=3, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(PlanError) as err:
        remove_layers(model, [0])
    assert str(err.value) == (
        "transformer.h.0.attn.scaling is 0.125 but a GPT2LMHeadModel rebuilt from the config gives 0.25 at the "
        "block's new position: from_pretrained would compute differently, remove later blocks only")
    pruned = remove_layers(model, [2])  # no kept block moves
    x = _inputs("gpt2")
    torch.testing.assert_close(_logits(pruned, *x), _logits(_skipping(model, ["transformer.h.2"]), *x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("layers,message", [
    ([3], "layer 3 out of range: model.layers has 3 blocks (0..2, or -3..-1)"),
    ([-4], "layer -4 out of range: model.layers has 3 blocks (0..2, or -3..-1)"),
    (["model.layers.7"], "layer 'model.layers.7' out of range: model.layers has 3 blocks (0..2, or -3..-1)"),
    ([0, -3], "block model.layers.0 given twice (0 and -3)"),
    ([1, "layers.1"], "block model.layers.1 given twice (1 and 'layers.1')"),
    ([0, 1, 2], "cannot remove all 3 blocks of model.layers: at least one must stay"),
    ([True], "layers are block indices or names, got True"),
    (["mlp"], "'mlp' does not name a block: give an index or a block name such as 'model.layers.0'"),
    (["encoder.block.0"], "'encoder.block.0': no block stack of LlamaForCausalLM is named 'encoder.block' (its stacks: model.layers)"),
])
def test_error_lines(layers, message):
    with pytest.raises(PlanError) as err:
        remove_layers(BUILDERS["llama"](), layers)
    assert str(err.value) == message


def test_error_lines_models():
    with pytest.raises(PlanError) as err:
        remove_layers(_tiny_t5_seq2seq(), [0])
    assert str(err.value) == ("T5ForConditionalGeneration has several block stacks (encoder.block, decoder.block): "
                              "name the block, e.g. 'encoder.block.0'")
    resnet = transformers.ResNetForImageClassification(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]))
    with pytest.raises(PlanError) as err:
        remove_layers(resnet, [0])
    assert str(err.value) == "ResNetForImageClassification has no list of transformer blocks to remove layers from"
    with pytest.raises(SurgeryError) as err:
        remove_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)), [0])
    assert str(err.value) == "remove_layers needs a transformers PreTrainedModel, got Sequential"


# -- block influence (ShortGPT) -------------------------------------------------------------------

def _make_identity(block):
    """Zero the projections that write into the residual stream: the block then returns its input."""
    with torch.no_grad():
        for qual, m in block.named_modules():
            if qual.rpartition(".")[2] in {"o_proj", "down_proj", "c_proj", "o", "wo"}:
                for p in m.parameters(recurse=False):
                    p.zero_()


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2", "t5"])
def test_identity_block_has_no_influence_and_goes_first(name):
    model = BUILDERS[name]()
    target = f"{STACK[name]}.1"
    _make_identity(model.get_submodule(target))
    ids = _inputs(name)[0]
    model.train()
    scores = layer_importance(model, ids)
    assert model.training and not any(m._forward_hooks for m in model.modules())  # left as it was
    assert list(scores) == [f"{STACK[name]}.{i}" for i in range(len(scores))]
    assert scores[target] == pytest.approx(0.0, abs=1e-6)
    assert all(s > 1e-3 for k, s in scores.items() if k != target)
    lowest = min(scores, key=scores.get)
    assert lowest == target
    # removing a block that adds nothing leaves the model's output as it was
    model.eval()
    torch.testing.assert_close(_logits(remove_layers(model, [lowest]), ids), _logits(model, ids), atol=1e-5, rtol=0)


def test_block_influence_is_one_minus_mean_cosine_of_hidden_states():
    """For every block but the last, ``output_hidden_states`` holds the block's input and output."""
    model = BUILDERS["llama"]()
    ids = _inputs("llama")[0]
    scores = layer_importance(model, ids)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    for i in range(len(hs) - 2):
        cos = torch.nn.functional.cosine_similarity(hs[i].double(), hs[i + 1].double(), dim=-1)
        assert scores[f"model.layers.{i}"] == pytest.approx(1 - cos.mean().item(), abs=1e-9)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # masked tokens do not count
    masked = layer_importance(model, ids, attention_mask=mask)
    assert masked != scores


def test_block_influence_needs_token_ids():
    with pytest.raises(SurgeryError) as err:
        layer_importance(BUILDERS["llama"](), torch.randn(2, 8))
    assert str(err.value) == "layer_importance needs token ids as a (batch, seq) LongTensor, got torch.Size([2, 8])"
