"""Text for language models: a corpus, a tokenizer, fixed-length blocks of token ids.

``spec`` is ``"pydoc"`` (the standard library's ``pydoc_data.topics``: about 465k characters of
English documentation, the built-in corpus) or the path of a UTF-8 text file. The last
``holdout`` share of the characters is the held-out split (perplexity); the rest is for calibration
and training.

Tokens come from the model's own tokenizer when one is given (a ``transformers`` tokenizer or a name
/ directory loadable offline), or the model's ``name_or_path`` loads offline; else a byte-level BPE
is trained with ``tokenizers`` on the training split, its vocabulary capped by the model's
``vocab_size`` (trained once per corpus and size in a process).

Examples
--------
>>> blocks = text_blocks("pydoc", seq_len=32, vocab_size=512, max_blocks=4)
>>> tuple(blocks.shape), blocks.dtype, int(blocks.max()) < 512
((4, 32), torch.int64, True)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import torch

from .data import DataError

__all__ = ["BUILTIN", "corpus", "split_text", "tokenizer_for", "text_blocks", "text_calibration", "is_text_spec"]

BUILTIN = "pydoc"
_BPE_CACHE: dict[tuple[str, int], Callable[[str], list[int]]] = {}
_MIN_BYTE_VOCAB = 257  # 256 bytes and at least one merge
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def is_text_spec(spec) -> bool:
    """Whether ``spec`` names text: the built-in corpus or a ``.txt`` file."""
    return isinstance(spec, str) and (spec == BUILTIN or spec.lower().endswith(".txt"))


def corpus(spec: str) -> str:
    """The text named by ``spec`` (``"pydoc"`` or a UTF-8 file)."""
    if spec == BUILTIN:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    if not os.path.isfile(spec):
        raise DataError(f"text {spec!r} not found (expected {BUILTIN!r} or a UTF-8 .txt file)")
    try:
        with open(spec, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read text {spec}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if not text.strip():
        raise DataError(f"text {spec} is empty")
    return text


def split_text(text: str, split: str = "train", holdout: float = 0.1) -> str:
    """``"train"`` (the head), ``"test"`` (the last ``holdout`` share) or ``"all"``."""
    if split not in ("train", "test", "all"):
        raise DataError(f"unknown split {split!r}; known splits: all, test, train")
    if not 0 < holdout < 1:
        raise DataError(f"holdout must be in (0, 1), got {holdout!r}")
    cut = int(len(text) * (1 - holdout))
    return {"train": text[:cut], "test": text[cut:], "all": text}[split]


def _own_tokenizer(tokenizer, model) -> Callable[[str], list[int]] | None:
    if tokenizer is not None and not isinstance(tokenizer, str):
        return lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])
    name = tokenizer or getattr(getattr(model, "config", None), "name_or_path", "") or ""
    if not name:
        return None
    if os.path.isdir(name) and not any(os.path.isfile(os.path.join(name, f)) for f in _TOKENIZER_FILES):
        if tokenizer is not None:
            raise DataError(f"{name} holds no tokenizer ({', '.join(_TOKENIZER_FILES)})")
        return None  # a save_pretrained model directory without its tokenizer
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:
        if tokenizer is not None:
            raise DataError(f"cannot load tokenizer {tokenizer!r} offline") from None
        return None
    return lambda s: list(tok(s, add_special_tokens=False)["input_ids"])


def _bpe(text: str, vocab_size: int) -> Callable[[str], list[int]]:
    key = (hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest(), vocab_size)
    if key not in _BPE_CACHE:
        try:
            from tokenizers import ByteLevelBPETokenizer
        except ImportError:  # pragma: no cover - tokenizers comes with the hf extra
            raise DataError("text data without a tokenizer needs the 'tokenizers' package (pip install surgery[hf])") from None
        tok = ByteLevelBPETokenizer()
        tok.train_from_iterator([text], vocab_size=vocab_size, min_frequency=2, show_progress=False)
        _BPE_CACHE[key] = lambda s, t=tok: t.encode(s).ids
    return _BPE_CACHE[key]


def tokenizer_for(model=None, text: str = "", tokenizer=None, vocab_size: int | None = None) -> Callable[[str], list[int]]:
    """``encode(str) -> token ids``: the model's own tokenizer, else a byte-level BPE trained on ``text``."""
    own = _own_tokenizer(tokenizer, model)
    if own is not None:
        return own
    if vocab_size is None:
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab_size is None:
        raise DataError("text data needs a tokenizer or a vocabulary size (the model has no config.vocab_size)")
    if vocab_size < _MIN_BYTE_VOCAB:
        raise DataError(f"the model's vocabulary ({vocab_size}) is smaller than a byte-level tokenizer's "
                        f"({_MIN_BYTE_VOCAB}); pass the model's own tokenizer or token ids")
    return _bpe(text, int(vocab_size))


def text_blocks(spec, model=None, *, seq_len: int, split: str = "train", tokenizer=None, vocab_size: int | None = None,
                max_blocks: int | None = None, holdout: float = 0.1) -> torch.Tensor:
    """Token ids of ``spec``'s ``split`` as a ``(blocks, seq_len)`` int64 tensor (the tail that does not
    fill a block is dropped). The BPE (when used) is always trained on the training split."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"sequence length must be an integer >= 2, got {seq_len!r}")
    text = corpus(spec)
    encode = tokenizer_for(model, split_text(text, "train", holdout), tokenizer, vocab_size)
    ids = torch.tensor(encode(split_text(text, split, holdout)), dtype=torch.int64)
    n = len(ids) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n < 1:
        raise DataError(f"text {spec!r} ({split}) holds {len(ids)} tokens: not one block of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def text_calibration(spec, model, example_inputs, *, tokenizer=None, max_blocks: int = 64) -> list:
    """Calibration batches for a language model: ``(ids, ids)`` pairs shaped like the example's
    token ids (its batch size and sequence length); the labels are the inputs (causal LM losses
    shift them)."""
    x = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.is_floating_point():
        raise DataError("text data needs a model whose example input is token ids of shape (batch, sequence)")
    batch, seq = int(x.shape[0]), int(x.shape[1])
    blocks = text_blocks(spec, model, seq_len=seq, tokenizer=tokenizer, max_blocks=max_blocks)
    return [(b, b) for b in blocks.split(batch) if len(b) == batch]
