"""Load a language model for evaluation: a ``save_pretrained`` directory (offline, no download), or
anything :func:`surgery.io.load_model` reads (a surgery checkpoint, a spec, a trusted pickle)."""

from __future__ import annotations

import os

from torch import nn

from ..errors import SurgeryError

__all__ = ["load_language_model"]


def load_language_model(path: str, *, trust: bool = False) -> tuple[nn.Module, str]:
    """``(model in eval mode, description)``; a directory must hold a ``config.json``."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SurgeryError(f"{path}: a model directory needs a config.json (save_pretrained output)")
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise SurgeryError("a Hugging Face model directory needs transformers (pip install surgery[hf])") from None
        try:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SurgeryError(f"cannot load {path} as a causal language model: {first}") from None
        return model.eval(), f"{type(model).__name__} from {path}"
    from ..io import load_model

    model, _, source = load_model(path, trust=trust)
    return model.eval(), source
