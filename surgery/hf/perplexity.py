"""Perplexity of a causal language model over fixed sliding windows of a text's held-out tail.

Windows of ``seq_len`` tokens start every ``stride`` tokens (default: ``seq_len``, disjoint windows).
In each window after the first, only the tokens not scored by an earlier window count (the first
``seq_len - stride`` tokens are context), so every token of the text is predicted exactly once,
from at most ``seq_len - 1`` tokens before it. ``ppl = exp(sum of NLL / tokens scored)``.

Examples
--------
>>> import torch
>>> class Uniform(torch.nn.Module):   # predicts every token of a 50-token vocabulary equally
...     def forward(self, ids):
...         return torch.zeros(*ids.shape, 50)
>>> round(perplexity(Uniform(), torch.arange(100) % 50, seq_len=16), 4)
50.0
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration.data import DataError
from ..dependency_graph.tracing import eval_mode

__all__ = ["perplexity", "logits_of"]


def logits_of(output) -> torch.Tensor:
    """The logits of a model output: ``.logits``, a tensor, or the first element of a tuple."""
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output:
        return logits_of(output[0])
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if isinstance(output, torch.Tensor):
        return output
    raise DataError(f"cannot find logits in the model output ({type(output).__name__})")


def _ids(model, data, seq_len: int, tokenizer) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        if data.is_floating_point():
            raise DataError("perplexity needs token ids (an integer tensor) or text")
        return data.reshape(-1).long()
    if isinstance(data, str):
        from ..calibration.text import text_blocks

        return text_blocks(data, model, seq_len=seq_len, split="test", tokenizer=tokenizer).reshape(-1)
    raise DataError(f"perplexity data must be text ('pydoc', a .txt file) or token ids, got {type(data).__name__}")


def perplexity(model: nn.Module, data="pydoc", *, seq_len: int = 128, stride: int | None = None, batch_size: int = 8,
               tokenizer=None, max_windows: int | None = None) -> float:
    """Perplexity of ``model`` (token ids in, logits out) on ``data``: ``"pydoc"`` / a text file (its
    held-out tail, tokenised as :mod:`surgery.calibration.text` does) or a tensor of token ids."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    stride = seq_len if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= seq_len:
        raise DataError(f"stride must be an integer in [1, seq_len], got {stride!r}")
    ids = _ids(model, data, seq_len, tokenizer)
    if len(ids) < seq_len:
        raise DataError(f"the text holds {len(ids)} tokens, fewer than one window of {seq_len}")
    starts = list(range(0, len(ids) - seq_len + 1, stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    nll, count = 0.0, 0
    with torch.no_grad(), eval_mode(model):
        for i in range(0, len(starts), batch_size):
            chunk = starts[i : i + batch_size]
            x = torch.stack([ids[s : s + seq_len] for s in chunk])
            logits = logits_of(model(x)).double()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
            loss = loss.view(len(chunk), seq_len - 1)
            for row, s in enumerate(chunk):
                first = 0 if s == 0 else seq_len - 1 - stride  # score only tokens no earlier window scored
                nll += float(loss[row, max(first, 0):].sum())
                count += seq_len - 1 - max(first, 0)
    return math.exp(nll / count)
