"""Config flags for biases a pruning added: FLAP's compensation gives Llama's ``o_proj`` / ``down_proj``
a bias (:mod:`surgery.compensation`), which a stock ``LlamaConfig`` describes only as
``attention_bias`` (a bias on q, k, v and o) or ``mlp_bias`` (gate, up and down).

When a projection covered by such a flag has a bias while the config says none, the flag is set and
every other projection it covers gets a bias of exact zeros (the outputs are unchanged), so a model
built from the config has the pruned model's tensors and ``from_pretrained`` rebuilds it. Whether
the class really reads the flag that way is left to :func:`surgery.hf.sync_config`'s shape check
against a model built from the config.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BIAS_FLAGS", "grant_bias_flags"]

#: config flag -> the projections (last name of the module) it gives a bias
BIAS_FLAGS = {
    "attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp_bias": ("gate_proj", "up_proj", "down_proj"),
}


def _projections(model: nn.Module, names) -> list[nn.Linear]:
    from .config import blocks

    return [m for _, block in blocks(model) for qual, m in block.named_modules()
            if isinstance(m, nn.Linear) and qual.rpartition(".")[2] in names]


def grant_bias_flags(model: nn.Module, config) -> list[str]:
    """Set each flag of :data:`BIAS_FLAGS` that ``config`` knows and has off but whose projections
    in ``model`` (changed in place) carry a bias, giving the others zero biases; the flags set."""
    known = config.to_dict()
    granted = []
    for flag, names in BIAS_FLAGS.items():
        if flag not in known or getattr(config, flag) is not False:
            continue
        linears = _projections(model, names)
        if not any(m.bias is not None for m in linears):
            continue
        for m in linears:
            if m.bias is None:
                w = m.weight
                m.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=w.requires_grad)
        setattr(config, flag, True)
        granted.append(flag)
    return granted
