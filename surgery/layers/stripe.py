"""Stripe-wise convolution (Meng et al., "Pruning Filter in Filter", NeurIPS 2020; seed 001).

A ``K x K`` filter is ``K*K`` stripes: the ``1 x 1 x C_in`` column of weights at one kernel position.
``StripeConv`` stores only the stripes that survived and computes, for each kernel position that has
any, a ``1 x 1`` convolution over the input shifted by that position, adding its outputs into the
filters they belong to. It equals the dense convolution with the dead stripes zeroed, and costs
``C_in x #stripes x H_out x W_out`` MACs (the dense count when nothing is pruned).

Examples
--------
>>> import torch
>>> conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False)
>>> mask = torch.rand(6, 3, 3) > 0.5
>>> s = StripeConv.from_conv(conv, mask)
>>> x = torch.randn(2, 4, 7, 7)
>>> masked = torch.nn.functional.conv2d(x, conv.weight * mask[:, None], padding=1)
>>> bool(torch.allclose(s(x), masked, atol=1e-6)), s.n_stripes == int(mask.sum())
(True, True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StripeConv"]


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class StripeConv(nn.Module):
    """The surviving stripes of a 2-D convolution (zero padding, ``groups == 1``).

    ``weight`` is ``(n_stripes, in_channels)``; buffers ``stripe_out`` (the filter of each stripe) and
    ``stripe_pos`` (its kernel row and column) say where each one goes.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = False, n_stripes: int = 0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.weight = nn.Parameter(torch.zeros(n_stripes, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.register_buffer("stripe_out", torch.zeros(n_stripes, dtype=torch.long))
        self.register_buffer("stripe_pos", torch.zeros(n_stripes, 2, dtype=torch.long))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, alive: torch.Tensor) -> "StripeConv":
        """The stripes of ``conv`` where ``alive`` (``out x K x K`` booleans) is true."""
        if conv.groups != 1 or isinstance(conv.padding, str) or conv.padding_mode != "zeros" or conv.weight.dim() != 4:
            raise ValueError("StripeConv takes a 2-D convolution with groups=1 and explicit zero padding")
        if tuple(alive.shape) != (conv.out_channels, *conv.kernel_size):
            raise ValueError(f"the stripe mask must be {(conv.out_channels, *conv.kernel_size)}, got {tuple(alive.shape)}")
        o, i, j = alive.nonzero(as_tuple=True)
        order = torch.argsort(i * conv.kernel_size[1] + j, stable=True)  # grouped by kernel position
        o, i, j = o[order], i[order], j[order]
        s = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.bias is not None, len(o))
        with torch.no_grad():
            s.weight.copy_(conv.weight.detach()[o, :, i, j])
            if conv.bias is not None:
                s.bias.copy_(conv.bias.detach())
            s.stripe_out.copy_(o)
            s.stripe_pos.copy_(torch.stack([i, j], 1))
        return s.to(conv.weight.dtype)

    @property
    def n_stripes(self) -> int:
        return self.weight.shape[0]

    def _runs(self) -> list[tuple[int, int, int, int]]:
        """``(row, col, start, end)``: stripes ``start:end`` share one kernel position."""
        pos = self.stripe_pos.tolist()
        runs, start = [], 0
        for k in range(1, len(pos) + 1):
            if k == len(pos) or pos[k] != pos[start]:
                runs.append((pos[start][0], pos[start][1], start, k))
                start = k
        return runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        n, _, h, w = x.shape
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
        out = x.new_zeros(n, self.out_channels, ho, wo)
        for r, c, a, b in self._runs():
            shifted = xp[:, :, r * dh : r * dh + sh * (ho - 1) + 1 : sh, c * dw : c * dw + sw * (wo - 1) + 1 : sw]
            y = F.conv2d(shifted, self.weight[a:b, :, None, None])
            out = out.index_add(1, self.stripe_out[a:b], y)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        dense = self.out_channels * self.kernel_size[0] * self.kernel_size[1]
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, stripes={self.n_stripes}/{dense}")
