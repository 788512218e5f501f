"""StripeConv (SWP) equals the masked dense conv, counts MACs by stripes, prunes its inputs and
round-trips through a checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from helpers import check_pruned_equals_masked
from surgery.layers import StripeConv


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(9, 9), (8, 10)])
def test_stripe_conv_equals_the_masked_dense_conv(k, stride, size):
    """S1 (float64): any mask, K 1/3/5, stride 1/2, odd and even sizes."""
    torch.manual_seed(k * 10 + stride)
    conv = nn.Conv2d(5, 7, k, stride=stride, padding=k // 2, bias=True).double()
    alive = torch.rand(7, k, k) > 0.4
    s = StripeConv.from_conv(conv, alive)
    x = torch.randn(2, 5, *size, dtype=torch.float64)
    want = F.conv2d(x, conv.weight * alive[:, None], conv.bias, stride=stride, padding=k // 2)
    assert s(x).shape == want.shape and float((s(x) - want).abs().max()) <= 1e-10


def test_macs_are_counted_by_stripes():
    """S2: C_in x #stripes x H_out x W_out; the dense count when nothing is pruned."""
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
    x = torch.randn(1, 4, 10, 10)
    dense = surgery.stats(conv, x).macs
    assert surgery.stats(StripeConv.from_conv(conv, torch.ones(6, 3, 3, dtype=torch.bool)), x).macs == dense
    alive = torch.rand(6, 3, 3) > 0.5
    assert surgery.stats(StripeConv.from_conv(conv, alive), x).macs == 4 * int(alive.sum()) * 5 * 5


class WithStripes(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.s = StripeConv.from_conv(nn.Conv2d(8, 6, 3, padding=1), torch.rand(6, 3, 3) > 0.3)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.s(torch.relu(self.bn(self.a(x))))))


def test_stripe_conv_inputs_prune_exactly_and_checkpoint_round_trips(tmp_path):
    model, x = WithStripes().eval(), torch.randn(1, 3, 8, 8)
    graph = surgery.trace(model, x)
    sizes = sorted(g.size for g in graph.groups if g.prunable)
    assert sizes == [8]  # a's channels (read by the stripes); the stripe outputs are fixed
    _, pruned, _ = check_pruned_equals_masked(model, x, "group-l1", 0.5)
    assert pruned.s.weight.shape[1] == 4 and pruned.s.in_channels == 4
    surgery.save(pruned, tmp_path / "s.pt", example_inputs=x)
    back = surgery.load(tmp_path / "s.pt")
    with torch.no_grad():
        assert torch.equal(back(x), pruned(x))
