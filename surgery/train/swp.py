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
  With ``example_inputs``, filters with no live stripe are first removed as ordinary channels
  (``prune_dead_filters``: a plan on their groups through :func:`surgery.pipeline.run`).
* Dead filters: a channel is dead when every conv writing it (all skeleton convs) has no live stripe
  for it (``channel_groups``, ``dead_channels``). As in the authors' VGG code, the hook keeps the
  BatchNorm affine (and any conv bias) of a dead channel at zero, so the channel is exactly zero and
  removing it changes nothing.
* ``choose_threshold(model, x, target_macs)``: our extension for a MACs budget. The smallest global
  threshold on ``|FS|`` (at least the training one) whose stripe model, dead filters removed, keeps at
  most ``target_macs`` of the original MACs (counted by stripes), found by bisection over the sorted
  skeleton magnitudes; ``apply_threshold`` applies it to a copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..layers import StripeConv

__all__ = ["Skeleton", "add_skeletons", "skeletons", "SkeletonHook", "to_stripes", "stripe_counts", "ChannelGroup",
           "channel_groups", "dead_channels", "zero_dead", "fold_skeletons", "prune_dead_filters", "apply_threshold",
           "choose_threshold"]

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

    def __init__(self, model: nn.Module, alpha: float = 1e-5, delta: float = 0.01, optimizer=None, groups=()):
        self.skeletons = list(skeletons(model).values())
        self.alpha, self.delta, self.optimizer, self.groups = alpha, delta, optimizer, tuple(groups)

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
            _clear_state(state, dead)
        if self.groups:
            zero_dead(model, self.groups, self.optimizer)


def _clear_state(state: dict, dead: torch.Tensor) -> None:
    for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
        if isinstance(state.get(key), torch.Tensor):
            state[key].masked_fill_(dead, 0.0)


@dataclass(frozen=True)
class ChannelGroup:
    """A group whose channels are written only by skeleton convs: ``writers`` and ``zeroed`` are
    ``(module, param, indices of each group channel)``; ``zeroed`` are the BatchNorm affine and conv
    biases held at zero for a dead channel."""

    id: int
    size: int
    writers: tuple
    zeroed: tuple


def channel_groups(model: nn.Module, example_inputs) -> list[ChannelGroup]:
    """The prunable groups of ``model`` (plain or with skeletons) whose every writer (a module with a
    ``weight`` member along dim 0 that is not a norm) is a skeleton-eligible conv."""
    from ..dependency_graph import trace as trace_graph
    from ..dependency_graph.tracing import normalize_inputs

    plain = fold_skeletons(model)
    graph = trace_graph(plain, normalize_inputs(example_inputs))
    out = []
    for g in graph.groups:
        if not g.prunable or g.cross_channel:
            continue
        writers, zeroed, ok = [], [], True
        for m in g.members:
            mod = plain.get_submodule(m.module) if m.module else plain
            if m.dim != 0:
                continue
            imap = tuple(tuple(ix) for ix in m.index_map())
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                if m.param in ("weight", "bias"):
                    zeroed.append((m.module, m.param, imap))
            elif m.param == "weight":
                ok = ok and _eligible(mod)
                writers.append((m.module, m.param, imap))
            elif m.param == "bias" and isinstance(mod, nn.Conv2d):
                zeroed.append((m.module, m.param, imap))
        if ok and writers:
            out.append(ChannelGroup(g.id, g.size, tuple(writers), tuple(zeroed)))
    return out


def dead_channels(model: nn.Module, groups) -> dict[int, list[int]]:
    """``{group id: dead channels}``: channels none of whose writers has a live stripe."""
    sk = skeletons(model)
    out = {}
    for g in groups:
        dead = np.ones(g.size, dtype=bool)
        for name, _, imap in g.writers:
            if name not in sk:
                dead[:] = False
                break
            live = (sk[name].fs.detach() != 0).flatten(1).any(1).cpu().numpy()
            for u, ix in enumerate(imap):
                if ix and live[list(ix)].any():
                    dead[u] = False
        if dead.any():
            out[g.id] = np.flatnonzero(dead).tolist()
    return out


@torch.no_grad()
def zero_dead(model: nn.Module, groups, optimizer=None) -> dict[int, list[int]]:
    """Zero the BatchNorm affine and conv bias of every dead channel (and their optimizer state) in
    place; return the dead channels."""
    dead = dead_channels(model, groups)
    by_id = {g.id: g for g in groups}
    for gid, units in dead.items():
        for name, param, imap in by_id[gid].zeroed:
            t = getattr(model.get_submodule(name) if name else model, param)
            idx = torch.tensor([i for u in units for i in imap[u]], dtype=torch.long, device=t.device)
            t.index_fill_(0, idx, 0.0)
            state = optimizer.state.get(t, {}) if optimizer is not None else {}
            mask = torch.zeros_like(t, dtype=torch.bool).index_fill_(0, idx, True)
            _clear_state(state, mask)
    return dead


def stripe_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{conv name: (live stripes, all stripes)}``."""
    return {name: (int((s.fs != 0).sum()), s.fs.numel()) for name, s in skeletons(model).items()}


def fold_skeletons(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every skeleton folded into its conv (``W * FS``, plain ``Conv2d``)."""
    out = copy.deepcopy(model)
    for name in skeletons(model):  # new modules: removing a parametrization would edit the class the copy shares
        _replace(out, name, _plain(model.get_submodule(name)))
    return out


def _plain(conv: nn.Conv2d) -> nn.Conv2d:
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, bias=conv.bias is not None).to(conv.weight)
    with torch.no_grad():
        plain.weight.copy_(conv.weight)  # the parametrized weight: W * FS
        if conv.bias is not None:
            plain.bias.copy_(conv.bias)
    return plain


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def prune_dead_filters(model: nn.Module, example_inputs, mode: str = "prune", groups=None):
    """``(folded model without the dead channels, plan)``: a skeleton-trained ``model`` folded, then a
    plan removing every dead channel (each group keeps at least one) applied through
    :func:`surgery.pipeline.run` (``mode="mask"`` zeroes them instead)."""
    from ..dependency_graph import trace as trace_graph
    from ..dependency_graph.tracing import normalize_inputs
    from ..methods import Scores
    from ..pipeline import run
    from ..planner import PlanOptions, build_plan

    groups = channel_groups(model, example_inputs) if groups is None else groups
    dead = dead_channels(model, groups)
    size = {g.id: g.size for g in groups}
    removed = {gid: units[1:] if len(units) == size[gid] else units for gid, units in dead.items()}
    folded = fold_skeletons(model)
    graph = trace_graph(folded, normalize_inputs(example_inputs))
    plan = build_plan(graph, "swp", 0.0, "dead filters", PlanOptions(), {}, Scores({}), removed, ())
    if not plan.groups:
        return folded, plan
    return run(folded, example_inputs, plan=plan, mode=mode).model, plan


def to_stripes(model: nn.Module, example_inputs=None) -> nn.Module:
    """A copy of a skeleton-trained ``model`` where every skeleton conv is a ``StripeConv`` of its live
    stripes (``W * FS`` folded in). Without ``example_inputs`` filters with no live stripe output only
    their bias; with them they are first removed as channels (:func:`prune_dead_filters`), and a
    stripe is live when its folded weights are not all zero."""
    if example_inputs is not None:
        out = prune_dead_filters(model, example_inputs)[0]
        for name in skeletons(model):
            conv = out.get_submodule(name)
            _replace(out, name, StripeConv.from_conv(conv, conv.weight.detach().ne(0).any(1)))
        return out
    out = copy.deepcopy(model)
    for name, s in list(skeletons(model).items()):
        _replace(out, name, StripeConv.from_conv(_plain(model.get_submodule(name)), s.fs.detach() != 0))
    return out


@torch.no_grad()
def apply_threshold(model: nn.Module, delta: float, groups=()) -> nn.Module:
    """A copy of a skeleton model with every ``|FS| <= delta`` zeroed (and dead channels' affine zeroed)."""
    out = copy.deepcopy(model)
    for s in skeletons(out).values():
        s.fs.masked_fill_(s.fs.abs() <= delta, 0.0)
    if groups:
        zero_dead(out, groups)
    return out


def _conv_costs(model: nn.Module, example_inputs) -> dict[str, int]:
    """``{skeleton conv: C_in x output positions}``: the MACs of one of its stripes."""
    from ..dependency_graph.tracing import normalize_inputs

    sizes, handles = {}, []
    for name in skeletons(model):
        conv = model.get_submodule(name)
        handles.append(conv.register_forward_hook(
            lambda m, i, o, name=name: sizes.__setitem__(name, m.in_channels * o.shape[-1] * o.shape[-2])))
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(*normalize_inputs(example_inputs))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return sizes


def choose_threshold(model: nn.Module, example_inputs, target_macs: float, delta: float = 0.0, groups=None) -> float:
    """The smallest threshold ``>= delta`` on ``|FS|`` (one of the skeleton magnitudes) whose stripe
    model (dead filters removed) keeps at most ``target_macs`` of ``model``'s dense MACs.

    The stripe count gives the MACs exactly as long as no filter dies (dead filters only lower them),
    so it bounds the search from above; the exact count (the model built) settles the rest."""
    from ..stats import stats

    groups = channel_groups(model, example_inputs) if groups is None else groups
    dense = stats(fold_skeletons(model), example_inputs).macs
    budget = target_macs * dense
    sk = skeletons(model)
    cost = _conv_costs(model, example_inputs)
    fixed = dense - sum(cost[n] * s.fs.numel() for n, s in sk.items())
    mags = torch.cat([s.fs.detach().abs().flatten() for s in sk.values()])
    cand = [delta] + sorted(set(mags[mags > delta].tolist()))

    def upper(d: float) -> int:
        return fixed + sum(cost[n] * int((s.fs.detach().abs() > d).sum()) for n, s in sk.items())

    def exact(d: float) -> int:
        return stats(to_stripes(apply_threshold(model, d, groups), example_inputs), example_inputs).macs

    def smallest(ok, lo: int, hi: int) -> int:
        """The smallest index in [lo, hi] where ``ok`` holds (``ok(hi)`` is taken as true)."""
        while lo < hi:
            mid = (lo + hi) // 2
            if ok(cand[mid]):
                hi = mid
            else:
                lo = mid + 1
        return hi

    top = smallest(lambda d: upper(d) <= budget, 0, len(cand) - 1)
    if top == 0 or exact(cand[top - 1]) > budget:
        return cand[top]
    return cand[smallest(lambda d: exact(d) <= budget, 0, top - 1)]
