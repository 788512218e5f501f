"""Save and load a pruned Hugging Face model whose layers have different widths.

A stock config holds one width per kind, so ``save_pretrained`` refuses such a model
(:class:`~surgery.hf.config.NonUniformWidths`). :func:`save_pruned` writes the same files
(``config.json`` with ``surgery_layer_widths``, safetensors weights) and :func:`load_pruned` builds
the class from the config, gives every block the widths recorded for it (a block of a model built
with that block's widths, so its attributes are right) and loads the weights strictly. A uniform
model goes through ``save_pretrained`` / ``from_pretrained`` unchanged.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import SurgeryError
from .config import _with_widths, head_dim_of

__all__ = ["save_pruned", "load_pruned"]


def save_pruned(model: nn.Module, path: str) -> None:
    """``save_pretrained`` for any pruned model (the per-layer widths travel in ``config.json``)."""
    type(model).save_pretrained(model, path)


def load_pruned(path: str, cls=None) -> nn.Module:
    """Load what :func:`save_pruned` wrote; ``cls`` defaults to the config's first architecture."""
    import transformers
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if cls is None:
        names = getattr(config, "architectures", None) or []
        cls = getattr(transformers, names[0], None) if names else None
        if cls is None:
            raise SurgeryError(f"{path}: config.json names no transformers architecture; pass cls=")
    widths = getattr(config, "surgery_layer_widths", None) or {}
    model = cls(config)
    common = {"head_dim": head_dim_of(config)}
    for name, w in widths.items():
        variant = cls(_with_widths(config, {**common, **w}))
        parent, _, index = name.rpartition(".")
        model.get_submodule(parent)[int(index)] = variant.get_submodule(name)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise SurgeryError(f"{path}: no .safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise SurgeryError(f"{path}: weights do not match the recorded widths (missing {sorted(set(missing) - tied)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]})")
    if tied:
        model.tie_weights()
    return model.eval()
