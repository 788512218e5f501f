"""Stripe-wise pruning (Meng et al., "Pruning Filter in Filter", NeurIPS 2020; seed 001): training side.

* ``add_skeletons(model)``: a copy of ``model`` where every eligible ``Conv2d`` (``groups == 1``,
  explicit zero padding, kernel larger than 1x1) computes with ``W * FS[:, None]``; the filter
  skeleton ``FS`` (``out x K x K``, initialised to ones) is a parametrization of the weight, so it
  trains with the network.
* ``SkeletonHook``: ``after_backward`` adds ``alpha * sign(FS)`` to the skeleton's gradient (the L1
  penalty); ``after_step`` zeroes every entry with ``|FS| <= delta`` **after** the optimizer step and
  zeroes its momentum too (the authors mask before the step, so momentum revives masked entries and
  the saved model holds values the final prune drops).
* ``to_stripes(model)``: a copy where each skeleton conv becomes a :class:`~surgery.layers.StripeConv`
  holding only the live stripes of ``W * FS``; it computes exactly what the trained model computes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..layers import StripeConv

__all__ = ["Skeleton", "add_skeletons", "skeletons", "SkeletonHook", "to_stripes", "stripe_counts"]

SWP = "Meng et al., Pruning Filter in Filter, NeurIPS 2020"


class Skeleton(nn.Module):
    """The filter skeleton of one conv: ``weight * fs[:, None]`` with ``fs`` of shape ``out x K x K``."""

    def __init__(self, out_channels: int, kernel_size: tuple[int, int]):
        super().__init__()
        self.fs = nn.Parameter(torch.ones(out_channels, *kernel_size))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.fs[:, None]


def _eligible(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.groups == 1 and not isinstance(m.padding, str) and m.padding_mode == "zeros"
            and max(m.kernel_size) > 1 and not parametrize.is_parametrized(m))


def add_skeletons(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with a filter skeleton on every eligible conv (``model`` is not modified)."""
    out = copy.deepcopy(model)
    for m in out.modules():
        if _eligible(m):
            parametrize.register_parametrization(m, "weight", Skeleton(m.out_channels, m.kernel_size).to(m.weight))
    return out


def skeletons(model: nn.Module) -> dict[str, Skeleton]:
    """``{conv name: its Skeleton}``."""
    out = {}
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations.weight:
                if isinstance(p, Skeleton):
                    out[name] = p
    return out


class SkeletonHook:
    """SWP's two training hooks; ``alpha`` is the L1 strength (1e-5 on CIFAR), ``delta`` the threshold
    (0.01 in the authors' runs; a tuned knob). ``optimizer`` is needed to clear masked momentum."""

    def __init__(self, model: nn.Module, alpha: float = 1e-5, delta: float = 0.01, optimizer=None):
        self.skeletons = list(skeletons(model).values())
        self.alpha, self.delta, self.optimizer = alpha, delta, optimizer

    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        for s in self.skeletons:
            if s.fs.grad is None:
                s.fs.grad = torch.zeros_like(s.fs)
            s.fs.grad.add_(self.alpha * torch.sign(s.fs))

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        for s in self.skeletons:
            dead = s.fs.abs() <= self.delta
            s.fs.masked_fill_(dead, 0.0)
            state = self.optimizer.state.get(s.fs, {}) if self.optimizer is not None else {}
            for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                if isinstance(state.get(key), torch.Tensor):
                    state[key].masked_fill_(dead, 0.0)


def stripe_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{conv name: (live stripes, all stripes)}``."""
    return {name: (int((s.fs != 0).sum()), s.fs.numel()) for name, s in skeletons(model).items()}


def to_stripes(model: nn.Module) -> nn.Module:
    """A copy of a skeleton-trained ``model`` where every skeleton conv is a ``StripeConv`` of its live
    stripes (``W * FS`` folded in). Filters with no live stripe output only their bias."""
    out = copy.deepcopy(model)
    for name, s in list(skeletons(model).items()):
        conv = model.get_submodule(name)
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, bias=conv.bias is not None).to(conv.weight)
        with torch.no_grad():
            plain.weight.copy_(conv.weight)  # the parametrized weight: W * FS
            if conv.bias is not None:
                plain.bias.copy_(conv.bias)
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, StripeConv.from_conv(plain, s.fs.detach() != 0))
    return out
