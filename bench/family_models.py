"""Small in-repo models written in the styles of the families people most want to prune (no package
needed): a YOLOv8-style detector (C2f with ``chunk``, SPPF, a multi-scale head returning a list), a
UNet (skip concatenations, transposed convs), a diffusion UNet (sinusoidal time embedding,
GroupNorm residual blocks, self-attention), and an audio encoder (1-D conv feature extractor and a
transformer encoder). Used by ``bench/families.py``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def cbs(cin: int, cout: int, k: int = 3, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class C2f(nn.Module):
    def __init__(self, cin: int, cout: int, n: int = 2):
        super().__init__()
        self.c = cout // 2
        self.cv1 = cbs(cin, 2 * self.c, 1)
        self.m = nn.ModuleList(nn.Sequential(cbs(self.c, self.c), cbs(self.c, self.c)) for _ in range(n))
        self.cv2 = cbs((2 + n) * self.c, cout, 1)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(y[-1] + m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.cv1, self.cv2 = cbs(cin, cin // 2, 1), cbs(cin * 2, cout, 1)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        x = self.cv1(x)
        a = self.pool(x)
        b = self.pool(a)
        return self.cv2(torch.cat([x, a, b, self.pool(b)], 1))


class YoloStyle(nn.Module):
    def __init__(self, classes: int = 8):
        super().__init__()
        self.stem, self.d1, self.c1 = cbs(3, 16, 3, 2), cbs(16, 32, 3, 2), C2f(32, 32)
        self.d2, self.c2 = cbs(32, 64, 3, 2), C2f(64, 64)
        self.sppf = SPPF(64, 64)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.neck = C2f(64 + 32, 32)
        self.heads = nn.ModuleList([nn.Conv2d(32, 4 + classes, 1), nn.Conv2d(64, 4 + classes, 1)])

    def forward(self, x):
        p3 = self.c1(self.d1(self.stem(x)))
        p4 = self.sppf(self.c2(self.d2(p3)))
        n3 = self.neck(torch.cat([self.up(p4), p3], 1))
        return [self.heads[0](n3), self.heads[1](p4)]


class UNet(nn.Module):
    def __init__(self, classes: int = 3, w: int = 16):
        super().__init__()
        self.e1, self.e2, self.e3 = cbs(3, w), cbs(w, 2 * w, 3, 2), cbs(2 * w, 4 * w, 3, 2)
        self.u2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, 2)
        self.d2 = cbs(4 * w, 2 * w)
        self.u1 = nn.ConvTranspose2d(2 * w, w, 2, 2)
        self.d1 = cbs(2 * w, w)
        self.out = nn.Conv2d(w, classes, 1)

    def forward(self, x):
        a = self.e1(x)
        b = self.e2(a)
        c = self.e3(b)
        y = self.d2(torch.cat([self.u2(c), b], 1))
        y = self.d1(torch.cat([self.u1(y), a], 1))
        return self.out(y)


class ResBlock(nn.Module):
    def __init__(self, c: int, t: int):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(4, c), nn.Conv2d(c, c, 3, padding=1)
        self.t = nn.Linear(t, c)
        self.n2, self.c2 = nn.GroupNorm(4, c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, temb):
        h = self.c1(F.silu(self.n1(x))) + self.t(temb)[:, :, None, None]
        return x + self.c2(F.silu(self.n2(h)))


class DiffusionUNet(nn.Module):
    def __init__(self, c: int = 32, t: int = 32):
        super().__init__()
        self.tdim = t
        self.temb = nn.Sequential(nn.Linear(t, t), nn.SiLU(), nn.Linear(t, t))
        self.inp = nn.Conv2d(3, c, 3, padding=1)
        self.r1, self.down = ResBlock(c, t), nn.Conv2d(c, c, 3, 2, 1)
        self.r2 = ResBlock(c, t)
        self.attn = nn.MultiheadAttention(c, 4, batch_first=True)
        self.up = nn.Upsample(scale_factor=2)
        self.r3 = ResBlock(c, t)
        self.out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x, timestep):
        half = self.tdim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = timestep[:, None].float() * freqs[None]
        temb = self.temb(torch.cat([args.sin(), args.cos()], -1))
        h = self.r1(self.inp(x), temb)
        h = self.r2(self.down(h), temb)
        b, c, hh, ww = h.shape
        seq = h.flatten(2).transpose(1, 2)
        seq = seq + self.attn(seq, seq, seq, need_weights=False)[0]
        h = seq.transpose(1, 2).reshape(b, c, hh, ww)
        return self.out(self.r3(self.up(h), temb))


class AudioEncoder(nn.Module):
    def __init__(self, d: int = 32, classes: int = 6):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(1, d, 10, 5), nn.GELU(), nn.Conv1d(d, d, 3, 2), nn.GELU(),
                                      nn.Conv1d(d, d, 3, 2), nn.GELU())
        self.proj = nn.Linear(d, d)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, wave):
        h = self.proj(self.features(wave).transpose(1, 2))
        return self.head(self.encoder(h).mean(1))


def detector_backbone():
    """torchvision's Faster R-CNN (MobileNetV3 FPN, random weights): pruned with submodule='backbone'."""
    import torchvision

    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None)


#: name -> (builder, example inputs, another-shape inputs, pipeline options)
FAMILIES = {
    "yolo-style": (YoloStyle, lambda: (torch.randn(1, 3, 64, 64),), lambda: (torch.randn(2, 3, 96, 128),), {}),
    "unet": (UNet, lambda: (torch.randn(1, 3, 64, 64),), lambda: (torch.randn(2, 3, 96, 64),), {}),
    "diffusion-unet": (DiffusionUNet, lambda: (torch.randn(1, 3, 16, 16), torch.tensor([7])),
                       lambda: (torch.randn(2, 3, 24, 24), torch.tensor([3, 900])), {"skip_cross_channel": True}),
    "audio-encoder": (AudioEncoder, lambda: (torch.randn(1, 1, 400),), lambda: (torch.randn(2, 1, 800),),
                      {"skip_cross_channel": True}),
    "detector-backbone": (detector_backbone, lambda: ([torch.rand(3, 160, 200)],),
                          lambda: ([torch.rand(3, 200, 240), torch.rand(3, 180, 180)],), {"submodule": "backbone"}),
}
