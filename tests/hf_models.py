"""Tiny random Hugging Face models for the transformer tests (built offline from configs, no downloads).

Every builder returns a model with a task head (so the hidden size is not a model output), seeded,
in eval mode, with ``use_cache=False`` (a ``DynamicCache`` output cannot be exported).
``example_inputs(name)`` gives matching inputs. The Mixture-of-Experts builders (``MOE_MODELS``:
Mixtral, Qwen2-MoE) are kept out of ``HF_MODELS``, which the generic transformer tests iterate.
Importing this module needs ``transformers``: call ``pytest.importorskip("transformers")`` before
importing it from a test.

    from hf_models import HF_MODELS, example_inputs  # tests/ on sys.path, as for helpers.py
    model = HF_MODELS["llama"]()
    out = model(*example_inputs("llama"))
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers

__all__ = [
    "HF_MODELS",
    "MOE_MODELS",
    "VOCAB",
    "example_inputs",
    "tiny_bert",
    "tiny_gemma2",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_mixtral",
    "tiny_qwen2_moe",
    "tiny_qwen3",
    "tiny_t5",
    "tiny_vit",
]

VOCAB = 128
_HIDDEN = 64
_INTERMEDIATE = 128
_LAYERS = 2
_HEADS = 4
_KV_HEADS = 2


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    model.config.use_cache = False
    return model.eval()


def _build(cls, config, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _finish(cls(config))


def _decoder_kwargs() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=_HIDDEN,
        intermediate_size=_INTERMEDIATE,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        num_key_value_heads=_KV_HEADS,
        max_position_embeddings=64,
        use_cache=False,
        tie_word_embeddings=False,
    )


def tiny_llama(seed: int = 0, **overrides) -> torch.nn.Module:
    """LlamaForCausalLM with GQA: 4 query heads, 2 KV heads, hidden 64, intermediate 128, 2 layers."""
    cfg = transformers.LlamaConfig(**{**_decoder_kwargs(), **overrides})
    return _build(transformers.LlamaForCausalLM, cfg, seed)


def tiny_qwen3(seed: int = 0, **overrides) -> torch.nn.Module:
    """Qwen3ForCausalLM (per-head q/k RMSNorm, explicit head_dim 16), GQA 4/2, tied embeddings."""
    kw = {**_decoder_kwargs(), "head_dim": 16, "tie_word_embeddings": True}
    cfg = transformers.Qwen3Config(**{**kw, **overrides})
    return _build(transformers.Qwen3ForCausalLM, cfg, seed)


def tiny_gemma2(seed: int = 0, **overrides) -> torch.nn.Module:
    """Gemma2ForCausalLM (soft-capping, sandwich norms, (1 + weight) RMSNorm), GQA 4/2, tied embeddings."""
    kw = {**_decoder_kwargs(), "head_dim": 16, "tie_word_embeddings": True, "sliding_window": 16}
    cfg = transformers.Gemma2Config(**{**kw, **overrides})
    return _build(transformers.Gemma2ForCausalLM, cfg, seed)


def tiny_gpt2(seed: int = 0, **overrides) -> torch.nn.Module:
    """GPT2LMHeadModel (Conv1D projections, fused qkv), 4 heads, hidden 64, 2 layers, tied embeddings."""
    kw = dict(vocab_size=VOCAB, n_positions=64, n_embd=_HIDDEN, n_layer=_LAYERS, n_head=_HEADS,
              n_inner=_INTERMEDIATE, bos_token_id=0, eos_token_id=0, use_cache=False)
    cfg = transformers.GPT2Config(**{**kw, **overrides})
    return _build(transformers.GPT2LMHeadModel, cfg, seed)


def tiny_bert(seed: int = 0, **overrides) -> torch.nn.Module:
    """BertForSequenceClassification (post-LayerNorm encoder, pooler, 3 labels), 4 heads, hidden 64, 2 layers."""
    kw = dict(vocab_size=VOCAB, hidden_size=_HIDDEN, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
              intermediate_size=_INTERMEDIATE, max_position_embeddings=64, type_vocab_size=2, num_labels=3)
    cfg = transformers.BertConfig(**{**kw, **overrides})
    return _build(transformers.BertForSequenceClassification, cfg, seed)


def tiny_t5(seed: int = 0, **overrides) -> torch.nn.Module:
    """T5ForTokenClassification (encoder only; relative position bias added to the scores, RMS-style
    T5LayerNorm, 5 labels), 4 heads of 16, hidden 64, 2 layers."""
    kw = dict(vocab_size=VOCAB, d_model=_HIDDEN, d_kv=16, d_ff=_INTERMEDIATE, num_layers=_LAYERS,
              num_heads=_HEADS, relative_attention_num_buckets=8, use_cache=False, num_labels=5)
    cfg = transformers.T5Config(**{**kw, **overrides})
    return _build(transformers.T5ForTokenClassification, cfg, seed)


def tiny_vit(seed: int = 0, **overrides) -> torch.nn.Module:
    """ViTForImageClassification on 32x32 images (patch 8, 10 labels), 4 heads, hidden 64, 2 layers."""
    kw = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=_HIDDEN, num_hidden_layers=_LAYERS,
              num_attention_heads=_HEADS, intermediate_size=_INTERMEDIATE, num_labels=10)
    cfg = transformers.ViTConfig(**{**kw, **overrides})
    return _build(transformers.ViTForImageClassification, cfg, seed)


HF_MODELS: dict[str, Callable[..., torch.nn.Module]] = {
    "llama": tiny_llama,
    "qwen3": tiny_qwen3,
    "gemma2": tiny_gemma2,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
    "t5": tiny_t5,
    "vit": tiny_vit,
}


def example_inputs(name: str, batch: int = 1, seq: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Positional inputs for ``HF_MODELS[name]`` or ``MOE_MODELS[name]``: token ids (batch, seq), or pixels
    (batch, 3, 32, 32) for ViT."""
    if name not in HF_MODELS and name not in MOE_MODELS:
        raise KeyError(f"unknown tiny model {name!r}; known: {sorted({**HF_MODELS, **MOE_MODELS})}")
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return (torch.randn(batch, 3, 32, 32, generator=g),)
    return (torch.randint(0, VOCAB, (batch, seq), generator=g),)


# -- Mixture-of-Experts (kept out of HF_MODELS, which the generic tests iterate) ---------------------

_EXPERTS = 4
_TOP_K = 2
_EXPERT_INTERMEDIATE = 32


def tiny_mixtral(seed: int = 0, **overrides) -> torch.nn.Module:
    """MixtralForCausalLM: 4 experts stored fused (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]),
    top-2 routing, hidden 64, expert intermediate 32, GQA 4/2, 2 layers."""
    kw = {**_decoder_kwargs(), "intermediate_size": _EXPERT_INTERMEDIATE, "num_local_experts": _EXPERTS,
          "num_experts_per_tok": _TOP_K, "sliding_window": None}
    cfg = transformers.MixtralConfig(**{**kw, **overrides})
    return _build(transformers.MixtralForCausalLM, cfg, seed)


def tiny_qwen2_moe(seed: int = 0, **overrides) -> torch.nn.Module:
    """Qwen2MoeForCausalLM: 4 fused experts (intermediate 32), top-2, plus a sigmoid-gated shared expert
    (an ordinary MLP, intermediate 64), qkv biases, hidden 64, GQA 4/2, 2 layers."""
    kw = {**_decoder_kwargs(), "moe_intermediate_size": _EXPERT_INTERMEDIATE, "shared_expert_intermediate_size": _HIDDEN,
          "num_experts": _EXPERTS, "num_experts_per_tok": _TOP_K, "norm_topk_prob": True}
    cfg = transformers.Qwen2MoeConfig(**{**kw, **overrides})
    return _build(transformers.Qwen2MoeForCausalLM, cfg, seed)


MOE_MODELS: dict[str, Callable[..., torch.nn.Module]] = {
    "mixtral": tiny_mixtral,
    "qwen2_moe": tiny_qwen2_moe,
}
