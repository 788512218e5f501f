"""A learned elementwise scale and/or shift, broadcast over the input (Caffe's ``Scale`` and ``Bias``).

``weight`` and ``bias`` have the input's shape from some axis on, with trailing ones, e.g.
``(C, 1, 1)`` for a per-channel affine on ``N x C x H x W``. The forward pass is two broadcast
arithmetic ops on parameters, so the fx front end traces into it and prunes the parameters along
with the channels they scale.

Examples
--------
>>> import torch
>>> m = Affine((4, 1, 1), weight=True, bias=True)
>>> with torch.no_grad():
...     _ = m.weight.fill_(2.0), m.bias.fill_(1.0)
>>> x = torch.randn(2, 4, 3, 3)
>>> bool(torch.equal(m(x), x * 2 + 1))
True
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Affine"]


class Affine(nn.Module):
    """``x * weight + bias`` with broadcast parameters; either one may be absent."""

    def __init__(self, shape, weight: bool = True, bias: bool = False):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        self.weight = nn.Parameter(torch.ones(shape)) if weight else None
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            x = x * self.weight
        if self.bias is not None:
            x = x + self.bias
        return x

    def extra_repr(self) -> str:
        shape = tuple((self.weight if self.weight is not None else self.bias).shape)
        return f"shape={shape}, weight={self.weight is not None}, bias={self.bias is not None}"
