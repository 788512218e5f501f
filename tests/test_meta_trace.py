"""A model on the meta device (an LLM too big to materialise) is traced by one static export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import surgery
import surgery.errors


class Untraceable(nn.Module):
    """fx cannot trace it (``len`` of a tensor), so the export front end takes it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) / len(x)


def test_meta_model_is_exported_once_and_grouped(monkeypatch):
    calls = []
    real = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: calls.append(k.get("dynamic_shapes")) or real(*a, **k))
    with torch.device("meta"):
        model = Untraceable().eval()
    with pytest.warns(UserWarning, match="on the meta device, where the graph cannot be run to check it"):
        graph = surgery.trace(model, torch.randn(2, 8, device="meta"))
    assert calls == [None]  # no dynamic tries that could only fail on meta tensors
    assert [g.size for g in graph.groups if g.prunable] == [16]


def test_weight_methods_refuse_a_meta_model_and_random_plans_it():
    with torch.device("meta"):
        model = Untraceable().eval()
    x = torch.randn(2, 8, device="meta")
    with pytest.warns(UserWarning, match="meta device"):
        plan = surgery.plan(model, x, method="random", ratio=0.5)
    assert [len(g.keep) for g in plan.groups] == [8]
    with pytest.warns(UserWarning, match="meta device"), pytest.raises(surgery.errors.PlanError) as info:
        surgery.plan(model, x, method="l1", ratio=0.5)
    assert str(info.value).startswith("method 'l1' reads the model's weights, but they are on the meta device (no data)")
