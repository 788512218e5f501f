"""surgery.stats counts attention: nn.MultiheadAttention (fast and slow paths), the fused
TransformerEncoderLayer, F.scaled_dot_product_attention, on fake tensors and in the real-run
fallback; and it reproduces torchvision's published ``_ops`` (GMACs) at each model's native size."""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import regnet

from surgery.stats import stats

B, L, S, E, FF, H = 2, 5, 7, 16, 32, 4


def _attention_macs(l_q: int, l_kv: int, e: int, kdim: int = E, vdim: int = E, batch: int = B) -> int:
    """In-projections, ``q k^T``, ``attn v`` and the out-projection of one attention call."""
    proj = batch * (l_q * E * e + l_kv * kdim * e + l_kv * vdim * e + l_q * e * E)
    return proj + 2 * batch * l_q * l_kv * e


class DataDependent(nn.Module):
    """Wraps a module behind control flow on tensor values: fake tensors fail, stats runs it for real."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *xs):
        if xs[0].sum() > -1e30:
            return self.inner(*xs)
        return xs[0]


class SelfAttention(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first)

    def forward(self, x):
        return self.attn(x, x, x)[0]


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, kdim=10, vdim=12)

    def forward(self, q, k, v):
        return self.attn(q, k, v, need_weights=False)[0]


@pytest.mark.parametrize("real_run", [False, True], ids=["fake", "real-run fallback"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["fast path", "slow path"])
def test_mha_self_attention_macs(batch_first, real_run):
    model = SelfAttention(batch_first)
    x = torch.randn(B, L, E) if batch_first else torch.randn(L, B, E)
    s = stats(DataDependent(model) if real_run else model, x)
    assert s.macs == _attention_macs(L, L, E)


def test_mha_kdim_vdim_cross_attention_macs():
    q, k, v = torch.randn(L, B, E), torch.randn(S, B, 10), torch.randn(S, B, 12)
    assert stats(CrossAttention(), (q, k, v)).macs == _attention_macs(L, S, E, kdim=10, vdim=12)


@pytest.mark.parametrize("real_run", [False, True], ids=["fake", "real-run fallback"])
def test_transformer_encoder_layer_macs(real_run):
    layer = nn.TransformerEncoderLayer(E, H, FF, batch_first=True)
    model = DataDependent(layer) if real_run else layer
    ffn = B * L * 2 * E * FF
    assert stats(model, torch.randn(B, L, E)).macs == _attention_macs(L, L, E) + ffn


class SDPA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("real_run", [False, True], ids=["fake", "real-run fallback"])
def test_scaled_dot_product_attention_macs(real_run):
    q, k, v = torch.randn(B, H, L, 8), torch.randn(B, H, S, 8), torch.randn(B, H, S, 6)
    model = DataDependent(SDPA()) if real_run else SDPA()
    assert stats(model, (q, k, v)).macs == B * H * L * S * (8 + 6)


# ---------------------------------------------------------------------------------------------
# torchvision's published figures
# ---------------------------------------------------------------------------------------------


def _published(name: str) -> tuple[float, int]:
    weights = torchvision.models.get_model_weights(name).DEFAULT
    return weights.meta["_ops"], weights.transforms().crop_size[0]


def _build(name: str, size: int, device: str) -> nn.Module:
    kwargs = {"image_size": size} if name.startswith("vit") else {}
    block_params = regnet.BlockParams.from_init_params

    def widths_on_cpu(*args, **kw):  # RegNet's builder reads tensor values (its block widths)
        with torch.device("cpu"):
            return block_params(*args, **kw)

    with warnings.catch_warnings(), mock.patch.object(regnet.BlockParams, "from_init_params", widths_on_cpu):
        warnings.simplefilter("ignore")
        with torch.device(device):
            return torchvision.models.get_model(name, **kwargs)


def _check_published(name: str, device: str) -> None:
    published, size = _published(name)
    model = _build(name, size, device)
    x = torch.empty(1, 3, size, size, device=next(model.parameters()).device)
    gmacs = stats(model, x).macs / 1e9
    # torchvision publishes GMACs (as "GFLOPS") with 3 decimals
    assert abs(gmacs - published) <= 0.0005 or abs(gmacs - published) / published < 0.01, (
        f"{name} at {size}px: {gmacs:.4f} GMACs counted, {published} published"
    )


@pytest.mark.parametrize("name", ["vit_b_16", "swin_t", "maxvit_t", "resnet50", "mobilenet_v3_small"])
def test_published_ops_cpu(name):
    """Built on CPU: ViT's attention takes nn.MultiheadAttention's fused fast path."""
    _check_published(name, "cpu")


def test_vit_b_16_counts_attention():
    published, _ = _published("vit_b_16")
    gmacs = stats(torchvision.models.vit_b_16(), torch.randn(1, 3, 224, 224)).macs / 1e9
    assert published == 17.564
    assert round(gmacs, 3) == published  # 11.27 without the 12 attention blocks


def _classification_models() -> list[str]:
    return [n for n in torchvision.models.list_models(module=torchvision.models)
            if "_ops" in torchvision.models.get_model_weights(n).DEFAULT.meta]


@pytest.mark.parametrize("name", _classification_models())
def test_published_ops_all(name):
    """Every classification model at its native size, built on the meta device (no memory, no init;
    ViT takes nn.MultiheadAttention's slow path there, so both paths are covered)."""
    _check_published(name, "meta")
