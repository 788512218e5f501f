"""The custom zoo's tiny models: one per tricky pruning case (used by test_custom_zoo.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------
# the zoo
# ---------------------------------------------------------------------------------------------


class ConvNet1d(nn.Module):
    """Conv1d -> ReLU -> Conv1d on (N, C, L)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv1d(8, 4, 3)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


class ConvNet2d(nn.Module):
    """Conv2d -> ReLU -> Conv2d."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


class ConvNet3d(nn.Module):
    """Conv3d -> ReLU -> Conv3d on (N, C, D, H, W)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv3d(8, 4, 1)

    def forward(self, x):
        return self.conv2(self.conv1(x).relu())


class GroupedConv(nn.Module):
    """1x1 conv -> grouped 3x3 conv (16 -> 16, ``groups`` groups, >1 in-channel per group) -> 1x1 conv."""

    def __init__(self, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 1)
        self.gconv = nn.Conv2d(16, 16, 3, padding=1, groups=groups)
        self.conv3 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.conv3(F.relu(self.gconv(F.relu(self.conv1(x)))))


class DepthwiseConv(nn.Module):
    """1x1 conv -> depthwise 3x3 conv (8 -> 8 * multiplier, groups=8) -> 1x1 conv."""

    def __init__(self, multiplier: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8 * multiplier, 3, padding=1, groups=8)
        self.conv3 = nn.Conv2d(8 * multiplier, 4, 1)

    def forward(self, x):
        return self.conv3(F.relu(self.dw(F.relu(self.conv1(x)))))


class ConvTransposeNet(nn.Module):
    """Conv2d -> ConvTranspose2d (stride 2) -> Conv2d."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.deconv = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1)
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv3(F.relu(self.deconv(F.relu(self.conv1(x)))))


class ChannelsLastMLP(nn.Module):
    """ConvNeXt-style MLP: conv -> permute to NHWC -> Linear/GELU/Linear on the last dim -> permute back."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(y)))
        return self.conv2(y.permute(0, 3, 1, 2))


class BatchNormNet(nn.Module):
    """Conv -> BatchNorm2d -> ReLU -> Conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(F.relu(self.bn(self.conv1(x))))


class InstanceNormNet(nn.Module):
    """Conv -> InstanceNorm2d(affine) -> ReLU -> Conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(F.relu(self.inorm(self.conv1(x))))


class LayerNormNet(nn.Module):
    """Linear -> LayerNorm over the features -> Linear: the LayerNorm group is cross-channel."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 4)
        self.fc3 = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(self.ln(self.fc1(x)))))


class GroupNormNet(nn.Module):
    """Conv -> GroupNorm(num_groups, 8) -> ReLU -> Conv; G>1 prunes whole groups, G=1 is cross-channel."""

    def __init__(self, num_groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(num_groups, 8)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(F.relu(self.gn(self.conv1(x))))


class ActivationsNet(nn.Module):
    """A chain of activations, PReLU (per channel) and dropout between two convs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.Sequential(nn.ReLU(), nn.GELU(), nn.SiLU(), nn.Hardswish(), nn.LeakyReLU(0.1), nn.Tanh())
        self.prelu = nn.PReLU(8)
        self.drop = nn.Dropout2d(0.3)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.drop(self.prelu(self.act(self.conv1(x))))
        y = F.dropout(torch.sigmoid(y) * 2.0, 0.2, training=self.training)
        return self.conv2(F.relu6(y))


class PoolingNet(nn.Module):
    """Conv -> MaxPool -> Conv -> AvgPool -> AdaptiveAvgPool(1) -> flatten -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool2 = nn.AvgPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.pool1(F.relu(self.conv1(x)))
        y = F.adaptive_max_pool2d(self.pool2(F.relu(self.conv2(y))), 2)
        return self.fc(torch.flatten(self.gap(y), 1))


class InterpolateNet(nn.Module):
    """Conv -> F.interpolate (nearest x2, then bilinear to a fixed size) -> Conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.interpolate(F.relu(self.conv1(x)), scale_factor=2, mode="nearest")
        y = F.interpolate(y, size=(12, 12), mode="bilinear", align_corners=False)
        return self.conv2(y)


class ArithmeticNet(nn.Module):
    """add/sub/mul/div between branches, with broadcast parameters (1, C, 1, 1) and (C, 1, 1)."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_c = nn.Conv2d(3, 8, 3, padding=1)
        self.shift = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.scale = nn.Parameter(torch.randn(8, 1, 1))
        self.conv_out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a, b, c = self.conv_a(x), self.conv_b(x), self.conv_c(x)
        y = (a + b) * self.scale - c / 2.0
        y = y + a / (1.0 + b.abs()) + self.shift * c
        return self.conv_out(y)


class SEBlock(nn.Module):
    """Squeeze-and-excitation gating: x * sigmoid(fc2(relu(fc1(pool(x))))) with broadcasting."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 4)
        self.fc2 = nn.Linear(4, 8)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1).flatten(1)))))
        return self.conv2(y * s.view(x.size(0), -1, 1, 1))


class CatChannels(nn.Module):
    """Two branches (8 and 6 channels) concatenated on the channel dim, then a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(14, 4, 1)

    def forward(self, x):
        return self.conv2(torch.cat([F.relu(self.conv_a(x)), self.conv_b(x)], dim=1))


class CatSpatial(nn.Module):
    """Two 8-channel branches concatenated along height: their channels are one group."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(torch.cat((self.conv_a(x), self.conv_b(x)), 2))


class SplitUnequal(nn.Module):
    """torch.split with explicit unequal sizes [3, 5] on the channels, one conv per part."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv_a = nn.Conv2d(3, 4, 1)
        self.conv_b = nn.Conv2d(5, 4, 1)

    def forward(self, x):
        a, b = torch.split(F.relu(self.conv1(x)), [3, 5], dim=1)
        return torch.cat([self.conv_a(a), self.conv_b(b)], 1)


class ChunkNet(nn.Module):
    """x.chunk(2, dim=1): two equal channel halves, each with its own consumer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv_a = nn.Conv2d(4, 4, 1)
        self.conv_b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a, b = self.conv1(x).chunk(2, dim=1)
        return self.conv_a(a) + self.conv_b(b)


class UnbindNet(nn.Module):
    """unbind along height (not channels): the channel dim passes through every part."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv1d(8, 4, 1)

    def forward(self, x):
        rows = F.relu(self.conv1(x)).unbind(2)
        return self.conv2(rows[0] + rows[3])


class SliceChannels(nn.Module):
    """getitem channel slicing x[:, :4]: channels 4..7 are never read (a separate, dead group)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv2(self.conv1(x)[:, :4])


class FlattenLinear(nn.Module):
    """Conv -> flatten(1) -> Linear: each channel owns H*W=16 input columns of the Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv1(x)), 1))


class ViewLinear(nn.Module):
    """Conv -> view(x.size(0), -1) -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        return self.fc(y.view(y.size(0), -1))


class ReshapeConstLinear(nn.Module):
    """Conv -> hard-coded reshape(1, 8*4*4) (batch 1) -> Linear; the constant must be rewritten."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv1(x)).reshape(1, 8 * 4 * 4))


class ViewConstLinear(nn.Module):
    """Conv -> view(-1, 8*4*4) (constant channel count, dynamic batch) -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv1(x)).view(-1, 8 * 4 * 4))


class PermuteTranspose(nn.Module):
    """permute to NHWC -> Linear -> transpose(1, 3) (to NCWH) -> conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 8)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.fc(self.conv(x).permute(0, 2, 3, 1))
        return self.conv2(torch.transpose(y, 1, 3).contiguous())


class ReduceMean(nn.Module):
    """Conv -> mean over (H, W) -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.conv1(x)).mean((2, 3)))


class SoftmaxChannels(nn.Module):
    """Conv -> softmax over channels (cross-channel) -> conv; conv2 -> softmax over W (per channel) -> conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv2(torch.softmax(self.conv1(x), dim=1))
        return self.conv3(F.softmax(y, dim=-1))


class MHANet(nn.Module):
    """Linear -> nn.MultiheadAttention(16, 4 heads, batch_first) self-attention -> Linear."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.out = nn.Linear(16, 8)

    def forward(self, x):
        h = self.proj(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(a)


class MHAIndexNet(MHANet):
    """Same as MHANet, but reads the attention output as ``attn(...)[0]`` instead of unpacking."""

    def forward(self, x):
        h = self.proj(x)
        return self.out(self.attn(h, h, h, need_weights=False)[0])


class GRUNet(nn.Module):
    """Linear -> GRU(12 -> 16, batch_first) -> Linear on the outputs."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(8, 12)
        self.gru = nn.GRU(12, 16, batch_first=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y, _ = self.gru(self.pre(x))
        return self.fc(y)


class LSTMNet(nn.Module):
    """Linear -> 2-layer LSTM(12 -> 16, batch_first) -> Linear on the outputs."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(8, 12)
        self.lstm = nn.LSTM(12, 16, num_layers=2, batch_first=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y, _ = self.lstm(self.pre(x))
        return self.fc(y)


class IdentityNet(nn.Module):
    """Conv -> nn.Identity -> Conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.idt = nn.Identity()
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(self.idt(self.conv1(x)))


class ResidualNet(nn.Module):
    """Stem conv + a ResNet basic block (conv-bn-relu-conv-bn, + identity) + 1x1 head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_a, self.bn_a = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv_b, self.bn_b = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = self.bn_b(self.conv_b(F.relu(self.bn_a(self.conv_a(x)))))
        return self.head(F.relu(x + y))


class ChannelShuffle(nn.Module):
    """ShuffleNet channel shuffle (view/transpose/view with sizes read from the tensor)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv1(x)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.conv2(y)


class ChannelShuffleConst(nn.Module):
    """Channel shuffle with hard-coded group sizes: view(n, 2, 4, h, w) ... view(n, 8, h, w)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv1(x)
        y = torch.transpose(y.view(-1, 2, 4, 6, 6), 1, 2).reshape(-1, 8, 6, 6)
        return self.conv2(y)


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------

Loc = tuple[str, str, int]  # (module, param, dim) of a group member


@dataclass
class Case:
    name: str
    make: Callable[[], nn.Module]
    shape: tuple  # one input shape
    expect: dict[str, tuple]  # dotted parameter path -> exact pruned shape
    attrs: dict[str, object] = field(default_factory=dict)  # dotted attribute path -> pruned value
    inputs: list[Loc] = field(default_factory=list)  # members whose group touches a model input
    outputs: list[Loc] = field(default_factory=list)  # members whose group touches a model output
    prunes: bool = True  # False where every prunable group is cross-channel (skipped by the helper)

    def __str__(self) -> str:
        return self.name


def _conv_chain(name, make, shape, k1, k2, spatial):
    return Case(
        name, make, shape,
        {"conv1.weight": (4, 3, *([k1] * spatial)), "conv1.bias": (4,), "conv2.weight": (4, 4, *([k2] * spatial)),
         "conv2.bias": (4,)},
        {"conv1.out_channels": 4, "conv2.in_channels": 4},
        inputs=[("conv1", "weight", 1)], outputs=[("conv2", "weight", 0)],
    )


CASES = [
    _conv_chain("conv1d", ConvNet1d, (2, 3, 16), 3, 3, 1),
    _conv_chain("conv2d", ConvNet2d, (2, 3, 10, 10), 3, 3, 2),
    _conv_chain("conv3d", ConvNet3d, (1, 3, 4, 6, 6), 3, 1, 3),
    Case("grouped_conv_g2", lambda: GroupedConv(2), (2, 3, 8, 8),
         {"conv1.weight": (8, 3, 1, 1), "gconv.weight": (8, 4, 3, 3), "gconv.bias": (8,), "conv3.weight": (4, 8, 1, 1)},
         {"gconv.groups": 2, "gconv.in_channels": 8, "gconv.out_channels": 8},
         inputs=[("conv1", "weight", 1)], outputs=[("conv3", "weight", 0)]),
    Case("grouped_conv_g4", lambda: GroupedConv(4), (2, 3, 8, 8),
         {"conv1.weight": (8, 3, 1, 1), "gconv.weight": (8, 2, 3, 3), "gconv.bias": (8,), "conv3.weight": (4, 8, 1, 1)},
         {"gconv.groups": 4, "gconv.in_channels": 8, "gconv.out_channels": 8},
         inputs=[("conv1", "weight", 1)], outputs=[("conv3", "weight", 0)]),
    Case("depthwise", lambda: DepthwiseConv(1), (2, 3, 8, 8),
         {"conv1.weight": (4, 3, 1, 1), "dw.weight": (4, 1, 3, 3), "dw.bias": (4,), "conv3.weight": (4, 4, 1, 1)},
         {"dw.groups": 4, "dw.in_channels": 4, "dw.out_channels": 4},
         inputs=[("conv1", "weight", 1)], outputs=[("conv3", "weight", 0)]),
    Case("depthwise_multiplier2", lambda: DepthwiseConv(2), (2, 3, 8, 8),
         {"conv1.weight": (4, 3, 1, 1), "dw.weight": (8, 1, 3, 3), "dw.bias": (8,), "conv3.weight": (4, 8, 1, 1)},
         {"dw.groups": 4, "dw.in_channels": 4, "dw.out_channels": 8},
         inputs=[("conv1", "weight", 1)], outputs=[("conv3", "weight", 0)]),
    Case("conv_transpose2d", ConvTransposeNet, (2, 3, 6, 6),
         {"conv1.weight": (4, 3, 3, 3), "deconv.weight": (4, 4, 3, 3), "deconv.bias": (4,), "conv3.weight": (4, 4, 1, 1)},
         {"deconv.in_channels": 4, "deconv.out_channels": 4},
         inputs=[("conv1", "weight", 1)], outputs=[("conv3", "weight", 0)]),
    Case("channels_last_mlp", ChannelsLastMLP, (2, 3, 5, 5),
         {"conv.weight": (4, 3, 1, 1), "fc1.weight": (8, 4), "fc1.bias": (8,), "fc2.weight": (4, 8), "fc2.bias": (4,),
          "conv2.weight": (4, 4, 1, 1)},
         {"fc1.in_features": 4, "fc1.out_features": 8, "fc2.out_features": 4},
         inputs=[("conv", "weight", 1)], outputs=[("conv2", "weight", 0)]),
    Case("batchnorm", BatchNormNet, (2, 3, 6, 6),
         {"conv1.weight": (4, 3, 3, 3), "bn.weight": (4,), "bn.bias": (4,), "bn.running_mean": (4,),
          "bn.running_var": (4,), "conv2.weight": (4, 4, 1, 1)},
         {"bn.num_features": 4},
         inputs=[("conv1", "weight", 1)], outputs=[("conv2", "weight", 0)]),
    Case("instancenorm_affine", InstanceNormNet, (2, 3, 6, 6),
         {"conv1.weight": (4, 3, 3, 3), "inorm.weight": (4,), "inorm.bias": (4,), "conv2.weight": (4, 4, 1, 1)},
         {"inorm.num_features": 4},
         inputs=[("conv1", "weight", 1)], outputs=[("conv2", "weight", 0)]),
    # LayerNorm's group is cross-channel: skipped by the helper (skip_cross_channel=True), fc2's is not
    Case("layernorm", LayerNormNet, (2, 6),
         {"fc1.weight": (8, 6), "ln.weight": (8,), "fc2.weight": (2, 8), "fc2.bias": (2,), "fc3.weight": (3, 2)},
         {"ln.normalized_shape": (8,)},
         inputs=[("fc1", "weight", 1)], outputs=[("fc3", "weight", 0)]),
    Case("groupnorm_g4", lambda: GroupNormNet(4), (2, 3, 6, 6),
         {"conv1.weight": (4, 3, 3, 3), "gn.weight": (4,), "gn.bias": (4,), "conv2.weight": (4, 4, 1, 1)},
         {"gn.num_groups": 2, "gn.num_channels": 4},
         inputs=[("conv1", "weight", 1)], outputs=[("conv2", "weight", 0)]),
    Case("groupnorm_g8_per_channel", lambda: GroupNormNet(8), (2, 3, 6, 6),
         {"conv1.weight": (4, 3, 3, 3), "gn.weight": (4,), "conv2.weight": (4, 4, 1, 1)},
         {"gn.num_groups": 4, "gn.num_channels": 4},
         inputs=[("conv1", "weight", 1)], outputs=[("conv2", "weight", 0)]),
    Case("groupnorm_g1_cross_channel", lambda: GroupNormNet(1), (2, 3, 6, 6),
         {"conv1.weight": (8, 3, 3, 3), "gn.weight": (8,), "conv2.weight": (4, 8, 1, 1)},
         {"gn.num_groups": 1, "gn.num_channels": 8},
         inputs=[("conv1", "weight", 1)], outputs=[("conv2", "weight", 0)], prunes=False),
    Case("activations_dropout", ActivationsNet, (2, 3, 6, 6),
         {"conv1.weight": (4, 3, 3, 3), "prelu.weight": (4,), "conv2.weight": (4, 4, 1, 1)},
         {"prelu.num_parameters": 4},
         inputs=[("conv1", "weight", 1)], outputs=[("conv2", "weight", 0)]),
    Case("pooling", PoolingNet, (2, 3, 8, 8),
         {"conv1.weight": (4, 3, 3, 3), "conv2.weight": (4, 4, 3, 3), "fc.weight": (4, 4), "fc.bias": (4,)},
         {"fc.in_features": 4},
         inputs=[("conv1", "weight", 1)], outputs=[("fc", "weight", 0)]),
    Case("interpolate", InterpolateNet, (2, 3, 5, 5),
         {"conv1.weight": (4, 3, 3, 3), "conv2.weight": (4, 4, 1, 1)}, {},
         inputs=[("conv1", "weight", 1)], outputs=[("conv2", "weight", 0)]),
    Case("arithmetic_broadcast", ArithmeticNet, (2, 3, 6, 6),
         {"conv_a.weight": (4, 3, 3, 3), "conv_b.weight": (4, 3, 3, 3), "conv_c.weight": (4, 3, 3, 3),
          "shift": (1, 4, 1, 1), "scale": (4, 1, 1), "conv_out.weight": (4, 4, 1, 1)}, {},
         inputs=[("conv_a", "weight", 1), ("conv_b", "weight", 1), ("conv_c", "weight", 1)],
         outputs=[("conv_out", "weight", 0)]),
    Case("se_gating", SEBlock, (2, 3, 6, 6),
         {"conv1.weight": (4, 3, 3, 3), "fc1.weight": (2, 4), "fc2.weight": (4, 2), "fc2.bias": (4,),
          "conv2.weight": (4, 4, 1, 1)},
         {"fc1.out_features": 2, "fc2.in_features": 2},
         inputs=[("conv1", "weight", 1)], outputs=[("conv2", "weight", 0)]),
    Case("cat_channels", CatChannels, (2, 3, 6, 6),
         {"conv_a.weight": (4, 3, 3, 3), "conv_b.weight": (3, 3, 3, 3), "conv2.weight": (4, 7, 1, 1)},
         {"conv2.in_channels": 7},
         inputs=[("conv_a", "weight", 1), ("conv_b", "weight", 1)], outputs=[("conv2", "weight", 0)]),
    Case("cat_spatial", CatSpatial, (2, 3, 6, 6),
         {"conv_a.weight": (4, 3, 3, 3), "conv_b.weight": (4, 3, 3, 3), "conv2.weight": (4, 4, 1, 1)}, {},
         inputs=[("conv_a", "weight", 1)], outputs=[("conv2", "weight", 0)]),
    # split [3, 5]: two groups; int(0.5*3)=1 and int(0.5*5)=2 channels go
    Case("split_unequal", SplitUnequal, (2, 3, 6, 6),
         {"conv1.weight": (5, 3, 1, 1), "conv_a.weight": (4, 2, 1, 1), "conv_b.weight": (4, 3, 1, 1)}, {},
         inputs=[("conv1", "weight", 1)], outputs=[("conv_a", "weight", 0), ("conv_b", "weight", 0)]),
    Case("chunk", ChunkNet, (2, 3, 6, 6),
         {"conv1.weight": (4, 3, 1, 1), "conv_a.weight": (4, 2, 1, 1), "conv_b.weight": (4, 2, 1, 1)}, {},
         inputs=[("conv1", "weight", 1)], outputs=[("conv_a", "weight", 0), ("conv_b", "weight", 0)]),
    Case("unbind_rows", UnbindNet, (2, 3, 4, 4),
         {"conv1.weight": (4, 3, 3, 3), "conv2.weight": (4, 4, 1)}, {},
         inputs=[("conv1", "weight", 1)], outputs=[("conv2", "weight", 0)]),
    # x[:, :4]: read channels 0..3 lose 2, dead channels 4..7 lose 2
    Case("getitem_slice", SliceChannels, (2, 3, 6, 6),
         {"conv1.weight": (4, 3, 1, 1), "conv2.weight": (4, 2, 1, 1)}, {},
         inputs=[("conv1", "weight", 1)], outputs=[("conv2", "weight", 0)]),
    Case("flatten_linear", FlattenLinear, (2, 3, 4, 4),
         {"conv1.weight": (4, 3, 3, 3), "fc.weight": (10, 64), "fc.bias": (10,)}, {"fc.in_features": 64},
         inputs=[("conv1", "weight", 1)], outputs=[("fc", "weight", 0)]),
    Case("view_batch_minus1", ViewLinear, (2, 3, 4, 4),
         {"conv1.weight": (4, 3, 3, 3), "fc.weight": (10, 64)}, {"fc.in_features": 64},
         inputs=[("conv1", "weight", 1)], outputs=[("fc", "weight", 0)]),
    Case("reshape_constant", ReshapeConstLinear, (1, 3, 4, 4),
         {"conv1.weight": (4, 3, 3, 3), "fc.weight": (10, 64)}, {"fc.in_features": 64},
         inputs=[("conv1", "weight", 1)], outputs=[("fc", "weight", 0)]),
    Case("view_constant_minus1_batch", ViewConstLinear, (2, 3, 4, 4),
         {"conv1.weight": (4, 3, 3, 3), "fc.weight": (10, 64)}, {"fc.in_features": 64},
         inputs=[("conv1", "weight", 1)], outputs=[("fc", "weight", 0)]),
    Case("permute_transpose", PermuteTranspose, (2, 3, 5, 4),
         {"conv.weight": (4, 3, 1, 1), "fc.weight": (4, 4), "conv2.weight": (4, 4, 1, 1)}, {},
         inputs=[("conv", "weight", 1)], outputs=[("conv2", "weight", 0)]),
    Case("reduce_mean", ReduceMean, (2, 3, 5, 5),
         {"conv1.weight": (4, 3, 3, 3), "fc.weight": (4, 4)}, {"fc.in_features": 4},
         inputs=[("conv1", "weight", 1)], outputs=[("fc", "weight", 0)]),
    # softmax over channels: conv1's group is cross-channel (skipped); conv2's (softmax over W) is not
    Case("softmax_channels", SoftmaxChannels, (2, 3, 5, 5),
         {"conv1.weight": (8, 3, 1, 1), "conv2.weight": (4, 8, 1, 1), "conv3.weight": (4, 4, 1, 1)}, {},
         inputs=[("conv1", "weight", 1)], outputs=[("conv3", "weight", 0)]),
    Case("multihead_attention", MHANet, (2, 5, 8),
         {"proj.weight": (8, 8), "attn.in_proj_weight": (24, 8), "attn.in_proj_bias": (24,),
          "attn.out_proj.weight": (8, 8), "attn.out_proj.bias": (8,), "out.weight": (8, 8)},
         {"attn.num_heads": 2, "attn.embed_dim": 8, "attn.head_dim": 4},
         inputs=[("proj", "weight", 1)], outputs=[("out", "weight", 0)]),
    Case("multihead_attention_index0", MHAIndexNet, (2, 5, 8),
         {"proj.weight": (8, 8), "attn.in_proj_weight": (24, 8), "attn.in_proj_bias": (24,),
          "attn.out_proj.weight": (8, 8), "attn.out_proj.bias": (8,), "out.weight": (8, 8)},
         {"attn.num_heads": 2, "attn.embed_dim": 8, "attn.head_dim": 4},
         inputs=[("proj", "weight", 1)], outputs=[("out", "weight", 0)]),
    Case("gru", GRUNet, (2, 5, 8),
         {"pre.weight": (6, 8), "gru.weight_ih_l0": (24, 6), "gru.weight_hh_l0": (24, 8), "gru.bias_ih_l0": (24,),
          "gru.bias_hh_l0": (24,), "fc.weight": (4, 8)},
         {"gru.hidden_size": 8, "gru.input_size": 6},
         inputs=[("pre", "weight", 1)], outputs=[("fc", "weight", 0)]),
    Case("lstm_2layer", LSTMNet, (2, 5, 8),
         {"pre.weight": (6, 8), "lstm.weight_ih_l0": (32, 6), "lstm.weight_hh_l0": (32, 8),
          "lstm.weight_ih_l1": (32, 8), "lstm.weight_hh_l1": (32, 8), "lstm.bias_hh_l1": (32,), "fc.weight": (4, 8)},
         {"lstm.hidden_size": 8, "lstm.input_size": 6},
         inputs=[("pre", "weight", 1)], outputs=[("fc", "weight", 0)]),
    Case("identity", IdentityNet, (2, 3, 5, 5),
         {"conv1.weight": (4, 3, 3, 3), "conv2.weight": (4, 4, 1, 1)}, {},
         inputs=[("conv1", "weight", 1)], outputs=[("conv2", "weight", 0)]),
    Case("residual_block", ResidualNet, (2, 3, 6, 6),
         {"stem.weight": (4, 3, 3, 3), "conv_a.weight": (4, 4, 3, 3), "bn_a.weight": (4,), "conv_b.weight": (4, 4, 3, 3),
          "bn_b.running_mean": (4,), "head.weight": (4, 4, 1, 1)},
         {"bn_a.num_features": 4, "bn_b.num_features": 4},
         inputs=[("stem", "weight", 1)], outputs=[("head", "weight", 0)]),
    Case("channel_shuffle", ChannelShuffle, (2, 3, 6, 6),
         {"conv1.weight": (4, 3, 1, 1), "conv2.weight": (4, 4, 1, 1)}, {},
         inputs=[("conv1", "weight", 1)], outputs=[("conv2", "weight", 0)]),
    Case("channel_shuffle_constants", ChannelShuffleConst, (2, 3, 6, 6),
         {"conv1.weight": (4, 3, 1, 1), "conv2.weight": (4, 4, 1, 1)}, {},
         inputs=[("conv1", "weight", 1)], outputs=[("conv2", "weight", 0)]),
]
CASE_IDS = [c.name for c in CASES]
BY_NAME = {c.name: c for c in CASES}


def build_case(case: Case) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = case.make().eval()
    x = torch.randn(*case.shape)
    return model, x


def forward(model, x):
    with torch.no_grad():
        return model(x)
