"""Tests for surgery.stats: params, MACs on fake tensors, latency, no mutation, one-line errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from surgery.errors import SurgeryError, TraceError
from surgery.stats import ModelStats, stats


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 5, 7))


def test_resnet50_matches_published_numbers():
    model = torchvision.models.resnet50(weights=None)
    s = stats(model, torch.randn(1, 3, 224, 224))
    assert s.params == sum(p.numel() for p in model.parameters())
    assert s.params == pytest.approx(25.56e6, rel=0.01)
    assert s.macs == pytest.approx(4.09e9, rel=0.01)
    assert s.latency_ms is None
    assert str(s) == "25.56 M params, 4.09 GMACs"


def test_tiny_model_exact_macs():
    model = _tiny()
    s = stats(model, torch.randn(2, 3, 6, 5))
    conv_macs = 2 * 8 * 6 * 5 * (3 * 3 * 3)      # batch * out elements * (in_ch * k * k)
    linear_macs = 2 * (8 * 6 * 5) * 7            # batch * in_features * out_features
    assert s.macs == conv_macs + linear_macs
    assert s.params == (3 * 8 * 9 + 8) + (8 * 6 * 5 * 7 + 7)
    assert s.as_dict() == {"params": s.params, "macs": s.macs, "latency_ms": None}


def test_tuple_inputs_and_fake_execution():
    seen = []

    class TwoIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, a, b):
            seen.append(type(a))
            return self.fc(a) + b

    s = stats(TwoIn(), (torch.randn(5, 4), torch.randn(5, 3)))
    assert s.macs == 5 * 4 * 3
    assert seen == [FakeTensor]  # the forward ran once, on fake tensors only


def test_model_not_mutated():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    model.train()
    model[2].eval()  # mixed flags must come back exactly as they were
    flags = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = stats(model, torch.randn(1, 3, 8, 8), latency=True, runs=3)
    assert s.macs > 0
    assert [m.training for m in model.modules()] == flags
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].device.type == "cpu"
        assert not isinstance(after[k], FakeTensor)
        assert torch.equal(after[k], v), k


def test_latency_flag():
    model = _tiny()
    x = torch.randn(1, 3, 6, 5)
    timed = stats(model, x, latency=True, runs=3)
    assert isinstance(timed.latency_ms, float) and timed.latency_ms > 0
    assert "ms" in str(timed)
    assert stats(model, x, latency=False).latency_ms is None


def test_frozen_dataclass():
    s = ModelStats(params=1, macs=2)
    with pytest.raises(Exception):
        s.params = 3  # type: ignore[misc]


def test_failing_forward_is_one_line_surgery_error():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            raise RuntimeError("boom\nsecond line\nthird line")

    with pytest.raises(SurgeryError) as info:
        stats(Broken(), torch.randn(1, 4))
    assert isinstance(info.value, TraceError)
    message = str(info.value)
    assert "\n" not in message and "boom" in message


def test_shape_mismatch_is_one_line_surgery_error():
    with pytest.raises(TraceError) as info:
        stats(_tiny(), torch.randn(1, 5, 6, 5))  # wrong channel count
    assert "\n" not in str(info.value)


def test_bad_example_inputs_type():
    with pytest.raises(SurgeryError):
        stats(_tiny(), "not a tensor")


def test_data_dependent_forward_falls_back_to_real_run():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x[x.sum(dim=1) > -1e9])  # boolean indexing: shape unknown to fake tensors

    s = stats(Masked(), torch.randn(6, 4))
    assert s.macs == 6 * 4 * 3
