"""Save and load a pruned Hugging Face model that a stock config cannot describe.

Widths that differ between layers, heads pruned with the hidden size kept on a class that ties the
head size to it (BERT, ViT, GPT-2), a tied Gemma table whose scale the config would change: the
model runs, but ``save_pretrained`` refuses it (:class:`~surgery.hf.config.NonUniformWidths`).
:func:`save_pruned` writes the same files (``config.json`` with ``surgery_layer_widths``, safetensors
weights) and :func:`load_pruned` builds the class from the config, gives every tensor its stored
shape, sets the modules' derived attributes from those shapes and checks that every weight is there.
A model a stock config describes goes through ``save_pretrained`` / ``from_pretrained`` unchanged.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from ..errors import SurgeryError
from .config import sync_config

__all__ = ["save_pruned", "load_pruned"]


def save_pruned(model: nn.Module, path: str) -> None:
    """``save_pretrained`` for any pruned model (the per-layer widths travel in ``config.json``)."""
    type(model).save_pretrained(model, path)


def load_pruned(path: str, cls=None) -> nn.Module:
    """Load what :func:`save_pruned` wrote; ``cls`` defaults to the config's first architecture.

    The class is built from the saved config, every tensor takes the shape stored in the weights
    (the per-layer widths, a head count the config cannot express), and the modules' derived
    attributes are then set from those shapes as after pruning (:func:`sync_config`)."""
    import transformers
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if cls is None:
        names = getattr(config, "architectures", None) or []
        cls = getattr(transformers, names[0], None) if names else None
        if cls is None:
            raise SurgeryError(f"{path}: config.json names no transformers architecture; pass cls=")
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise SurgeryError(f"{path}: no .safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(config)
    expected = set(model.state_dict())
    # names of one tensor (tied embeddings, T5's encoder.embed_tokens = shared): save_pretrained keeps one
    owner: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        owner.setdefault(id(t), []).append(name)
    alias = {n: names for names in owner.values() for n in names}
    tied = {k for k in expected - set(state) if any(a in state for a in alias.get(k, ()))}
    missing, unexpected = sorted(expected - set(state) - tied), sorted(set(state) - expected)
    if missing or unexpected:
        raise SurgeryError(f"{path}: weights do not match {cls.__name__} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    placed: dict[str, torch.Tensor] = {}
    for key in [*state, *tied]:  # a second module holding the same tensor takes the stored one too
        owner_name, _, name = key.rpartition(".")
        module = model.get_submodule(owner_name)
        source = key if key in state else next(a for a in alias[key] if a in state)
        value = placed.get(source)
        if value is None:
            value = placed[source] = (nn.Parameter(state[key], requires_grad=module._parameters[name].requires_grad)
                                      if name in module._parameters else state[key])
        (module._parameters if name in module._parameters else module._buffers)[name] = value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sync_config(model)
    return model.eval()
