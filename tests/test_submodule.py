"""Pruning one submodule in place: its real inputs are captured from the whole model, it is pruned
alone, and the whole model comes back with the part replaced."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import surgery
from helpers import assert_same_state, rel_err, state_snapshot
from surgery.errors import PlanError


class Detectorish(nn.Module):
    """A backbone worth pruning inside data-dependent post-processing that no front end traces."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, images: list[torch.Tensor]):
        feats = self.head(self.backbone(torch.stack(images)))
        if float(feats.abs().max()) > 1e6:  # data-dependent control flow: neither front end traces it
            feats = feats / feats.abs().max()
        keep = feats[:, 0] > feats[:, 0].mean()
        return [f[0][k].sort().values for f, k in zip(feats, keep)], feats


def test_submodule_is_pruned_in_place_and_the_whole_model_returned():
    model = Detectorish().eval()
    images = [torch.randn(3, 12, 12), torch.randn(3, 12, 12)]
    before = state_snapshot(model)
    with pytest.raises(surgery.SurgeryError, match="cannot trace"):
        surgery.trace(model, (images,))
    res = surgery.pipeline.run(model, (images,), "l1", 0.5, submodule="backbone")
    whole = res.model
    assert type(whole) is Detectorish and type(whole.backbone) is nn.Sequential and whole.head is not model.head
    assert whole.backbone[0].out_channels == 8 and whole.backbone[3].out_channels == 8
    assert whole.backbone[6].out_channels == 8  # the part's own output keeps its width
    assert res.plan.options["submodule"] == "backbone"
    masked = surgery.apply(model, res.plan, mode="mask")
    with torch.no_grad():
        other = [torch.randn(3, 20, 16)] * 3  # any batch and image size
        assert rel_err(whole(other)[1], masked(other)[1]) < 1e-5
    assert_same_state(model, before)
    replay = surgery.apply(model, res.plan)  # a submodule plan applies to the whole model again
    assert [p.shape for p in replay.parameters()] == [p.shape for p in whole.parameters()]


def test_data_driven_methods_see_the_submodules_real_inputs():
    model = Detectorish().eval()
    images = [torch.randn(3, 12, 12)]
    cal = [[torch.randn(3, 12, 12) for _ in range(4)] for _ in range(2)]  # batches of the whole model's input
    res = surgery.pipeline.run(model, (images,), "apoz", 0.5, data=[(c, None) for c in cal], submodule="backbone")
    assert res.plan.groups and type(res.model) is Detectorish
    with pytest.raises(PlanError, match="needs labels, which belong to the whole model's output"):
        surgery.pipeline.run(model, (images,), "taylor", 0.5, data=[(c, None) for c in cal], submodule="backbone")


def test_bad_submodule_names_the_children():
    with pytest.raises(PlanError, match=r"the model has no submodule 'neck'; its children are: backbone, head"):
        surgery.prune(Detectorish().eval(), ([torch.randn(3, 8, 8)],), submodule="neck")


def test_fasterrcnn_backbone_recipe():
    det = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None).eval()
    images = [torch.rand(3, 160, 200)]
    res = surgery.pipeline.run(det, (images,), "l1", 0.5, submodule="backbone")
    pruned = res.model
    assert type(pruned) is type(det) and type(pruned.backbone) is type(det.backbone)
    with torch.no_grad():
        for imgs in (images, [torch.rand(3, 240, 180), torch.rand(3, 200, 260)]):
            out = pruned(imgs)
            assert len(out) == len(imgs) and set(out[0]) == {"boxes", "labels", "scores"}
    x = res.graph.example_inputs
    assert surgery.stats(pruned.backbone, x).macs < 0.5 * surgery.stats(det.backbone, x).macs
