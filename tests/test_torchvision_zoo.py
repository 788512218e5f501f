"""Golden equivalence over every torchvision classification model (80 in torchvision 0.29).

Each model is built with random weights and 10 classes, traced at a small input, planned with l1 at
ratio 0.5 (groups with a cross-channel statistic skipped for the equality check), and applied in
both modes: output shape kept, pruned == masked, fewer parameters, user's model untouched.
Models with fixed input sizes get the smallest size they accept.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torchvision

import surgery
from helpers import check_pruned_equals_masked, n_params

MODELS = torchvision.models.list_models(module=torchvision.models)

#: Models that would fail, with the expected error. Empty: every model passes.
UNTRACEABLE_MODELS: dict[str, tuple[type, str]] = {}


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    kwargs, size = {}, 64
    if name.startswith("vit_"):
        size = int(name.rsplit("_", 1)[1]) * 2
        kwargs = {"image_size": size}
    elif name.startswith("maxvit"):
        size = 224
    elif name in ("inception_v3", "googlenet"):
        kwargs, size = {"aux_logits": False, "init_weights": False}, 96 if name == "inception_v3" else 64
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs).eval()
    randomize(model)
    return model, torch.randn(2, 3, size, size)


@torch.no_grad()
def randomize(model: torch.nn.Module) -> None:
    """Give zero-initialised parameters (ViT's head, layer scales) and BatchNorm statistics random
    values, so that no output is trivially zero and BN is not the identity."""
    for p in model.parameters():
        if p.dim() and not p.abs().sum():
            p.normal_(0.0, 0.02)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            if m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)


def test_zoo_is_complete():
    assert len(MODELS) >= 80


@pytest.mark.parametrize("name", MODELS)
def test_pruned_equals_masked(name):
    if name in UNTRACEABLE_MODELS:
        exc, pattern = UNTRACEABLE_MODELS[name]
        with pytest.raises(exc, match=pattern):
            surgery.trace(*build(name))
        return
    model, x = build(name)
    # the rewrite law on the GraphModule; the user's-class output is tested in test_module_output.py and
    # swept by bench/families.py (building and checking it for all 80 models would double this test)
    plan, pruned, _ = check_pruned_equals_masked(model, x, method="group-l1", ratio=0.5, output="graph")
    assert plan.groups, f"{name}: no prunable group"
    if any(g.prunable and g.cross_channel for g in surgery.trace(pruned, x).groups):
        # pruning the cross-channel groups too still gives a valid smaller model with the same output shape
        full = surgery.prune(model, x, method="group-l1", ratio=0.5, output="graph")
        with torch.no_grad():
            assert full(x).shape == model(x).shape
        assert n_params(full) < n_params(pruned)
        del full
    del model, pruned
    gc.collect()
