"""free_outputs: channels of named model outputs may shrink when their consumer is pruned too."""

from __future__ import annotations

import torch
from torch import nn

import surgery
from helpers import rel_err


class TwoHeads(nn.Module):
    """Returns detections and the neck's feature map (as a YOLO eval output does)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.neck = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        feat = self.neck(torch.relu(self.stem(x)))
        return self.head(torch.relu(feat)), feat


def test_free_output_channels_become_prunable_and_the_plan_records_them():
    model, x = TwoHeads().eval(), torch.randn(1, 3, 8, 8)
    held = surgery.trace(model, x)
    assert [g.size for g in held.groups if g.prunable] == [8]  # the neck's 16 channels are a model output
    free = surgery.trace(model, x, free_outputs=["neck"])
    assert sorted(g.size for g in free.groups if g.prunable) == [8, 16]
    res = surgery.pipeline.run(model, x, "l1", 0.5, free_outputs=["neck"])
    assert res.plan.options["free_outputs"] == ["neck"]
    det, feat = res.model(x)
    assert det.shape == (1, 4, 8, 8) and feat.shape == (1, 8, 8, 8)
    masked = surgery.apply(model, res.plan, mode="mask")
    with torch.no_grad():
        assert rel_err(det, masked(x)[0]) < 1e-5
    replay = surgery.apply(model, res.plan)  # the recorded option re-frees the output on replay
    assert replay(x)[1].shape == (1, 8, 8, 8)
