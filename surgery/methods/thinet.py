"""ThiNet (Luo, Wu, Lin): prune a layer's channels by how well the *next* layer's output can be
reconstructed without them.

* ``thinet`` (ICCV 2017, "ThiNet: A Filter Level Pruning Method for Deep Neural Network
  Compression"): for every consumer of a group's channels (a conv with ``groups == 1`` and zero
  padding, or a linear), sample ``samples_per_image`` output positions per calibration image (a
  random output channel ``o`` and a random spatial / token position). Each input channel ``c``
  contributes ``x_c = sum_k W[o, c, k] * a_pad[c, pos + k]`` and the contributions sum exactly to the
  consumer's bias-free output there. Channels are removed greedily (paper eq. 6): the next one is the
  channel whose contribution, added to those already removed, changes the output least in the
  squared sense. A channel's score is its place in that removal order (removed first = lowest).
  With ``scale`` (default), the kept channels' input slices of every consumer are rescaled by the
  least-squares ``w = argmin ||X_S w - y||`` (a diagonal fold).
* ``thinet-forward`` (TPAMI 2018, "ThiNet: Pruning CNN Filters for a Thinner Net"): forward
  selection with a least-squares refit after each pick (orthogonal matching pursuit); the first
  channel picked is the most important. Same statistics and fold.

Everything is computed from ``G = X^T X`` (float64, accumulated batch by batch; ``X^T y = G 1``), so
the sampled rows are never stored. A group with several consumers adds their ``G``.

``ratio`` here is the fraction of channels **removed**; ThiNet's ``compress_rate`` is the fraction
**kept** (ThiNet-70 keeps 70%: ``ratio=0.3``).

``scope="inner"`` (default) scores only groups that exactly one conv / linear produces, as the paper
does (residual-stream groups, written by several layers, are left whole with a reason);
``scope="all"`` scores every group some conv / linear consumes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..calibration import record
from ..roles import Site, consumers, producers
from . import _gram
from ._registry import Option, register_method
from .context import ScoreContext, Scores

__all__ = ["Consumer", "sample_positions", "contributions", "batch_xy", "collect_grams", "thinet", "thinet_forward"]

ICCV = "Luo, Wu, Lin, ThiNet: A Filter Level Pruning Method for Deep Neural Network Compression, ICCV 2017"
TPAMI = "Luo, Zhang, Zhou, Xie, Wu, Lin, ThiNet: Pruning CNN Filters for a Thinner Net, TPAMI 2018"

OPTIONS = (
    Option("samples_per_image", int, 10, "sampled output positions per calibration image (per consumer)", low=1),
    Option("scale", bool, True, "fold least-squares scales of the kept channels into their consumers"),
    Option("scope", str, "inner", "'inner': groups with one producing layer (as the paper); 'all': every consumed group",
           choices=("inner", "all")),
    Option("ridge", float, 1e-8, "ridge of the least-squares scales, relative to the mean diagonal of G", low=0.0),
    Option("seed", int, 0, "seed of the sampled positions"),
)


class Consumer:
    """A consumer call and how its input-dim entries map onto one group's channels."""

    def __init__(self, site: Site, member, size: int, weight: torch.Tensor):
        self.site = site
        self.size = size
        self.weight = weight.detach()
        units = np.full(weight.shape[1], -1, dtype=np.int64)
        units[np.asarray(member.indices, dtype=np.int64)] = np.asarray(member.units, dtype=np.int64)
        self.units = units
        own = units >= 0
        self.cols = torch.from_numpy(np.flatnonzero(own))
        self.col_units = torch.from_numpy(units[own])
        self.other = torch.from_numpy(np.flatnonzero(~own))


def _conv_out(site: Site, act_shape, kernel) -> tuple[int, ...]:
    nd = len(kernel)
    return tuple(
        (act_shape[2 + d] + 2 * site.padding[d] - site.dilation[d] * (kernel[d] - 1) - 1) // site.stride[d] + 1
        for d in range(nd)
    )


def sample_positions(site: Site, weight: torch.Tensor, act: torch.Tensor, per_image: int,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """``per_image`` random (output channel, position) pairs per image of ``act``: ``(n, o, pos)``
    with ``pos`` one index tensor per spatial dim (conv) or per token dim (linear on 3-D+ input)."""
    N = act.shape[0]
    m = N * per_image
    n = torch.arange(N).repeat_interleave(per_image)
    o = torch.randint(weight.shape[0], (m,), generator=gen)
    if site.kind == "conv":
        sizes = _conv_out(site, act.shape, tuple(weight.shape[2:]))
    else:
        sizes = tuple(act.shape[1:-1])
    pos = tuple(torch.randint(max(s, 1), (m,), generator=gen) for s in sizes)
    return n, o, pos


def contributions(site: Site, weight: torch.Tensor, act: torch.Tensor, n, o, pos) -> torch.Tensor:
    """``(m x in_channels)``: each input entry's contribution to the consumer's output at the sampled
    ``(n, o, pos)``; rows sum to the output minus bias. One gather, no loop over samples."""
    W = weight.detach().float()
    a = act.detach().float()
    m = len(n)
    if site.kind == "linear":
        a3 = a.reshape(a.shape[0], -1, a.shape[-1])
        p = pos[0] if pos else torch.zeros(m, dtype=torch.long)
        if len(pos) > 1:  # several token dims: flatten them in row-major order
            p = torch.zeros(m, dtype=torch.long)
            for d, idx in enumerate(pos):
                p = p * a.shape[1 + d] + idx
        return W[o] * a3[n, p]
    kernel = tuple(W.shape[2:])
    nd = len(kernel)
    pad = [q for d in reversed(range(nd)) for q in (site.padding[d], site.padding[d])]
    ap = F.pad(a, pad) if any(pad) else a
    index: list[torch.Tensor] = [n.view(m, *([1] * nd))]
    for d in range(nd):
        k = torch.arange(kernel[d]) * site.dilation[d]
        index.append((pos[d] * site.stride[d]).view(m, *([1] * nd)) + k.view(*[kernel[d] if i == d else 1 for i in range(nd)]))
    patch = ap[(index[0], slice(None), *index[1:])]  # (m, K..., Cin): advanced indices around a slice go first
    K = math.prod(kernel)
    return torch.einsum("mck,mkc->mc", W[o].reshape(m, W.shape[1], K), patch.reshape(m, K, W.shape[1]))


def _group_x(c: Consumer, full: torch.Tensor) -> torch.Tensor:
    X = full.new_zeros(full.shape[0], c.size)
    return X.index_add_(1, c.col_units, full[:, c.cols])


def batch_xy(graph, group, site: Site, member, act: torch.Tensor, out: torch.Tensor, per_image: int = 10,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` for one batch and one consumer: ``X`` (samples x group.size) the group channels'
    contributions, ``y`` the consumer's real output ``out`` at the same positions minus its bias and
    minus the contributions of input entries outside the group. ``X.sum(1) == y`` (ThiNet check T1)."""
    weight = getattr(graph.root.get_submodule(site.owner) if site.owner else graph.root, site.weight)
    c = Consumer(site, member, group.size, weight)
    gen = torch.Generator().manual_seed(seed)
    n, o, pos = sample_positions(site, weight, act, per_image, gen)
    full = contributions(site, weight, act, n, o, pos)
    if site.kind == "linear":
        o3 = out.detach().float().reshape(out.shape[0], -1, out.shape[-1])
        p = torch.zeros(len(n), dtype=torch.long)
        for d, idx in enumerate(pos):
            p = p * out.shape[1 + d] + idx
        y = o3[n, p, o]
    else:
        y = out.detach().float()[(n, o, *pos)]
    if site.bias is not None:
        bias = getattr(graph.root.get_submodule(site.owner) if site.owner else graph.root, site.bias)
        y = y - bias.detach().float()[o]
    y = y - full[:, c.other].sum(1)
    return _group_x(c, full).double().numpy(), y.double().numpy()


def _weight(graph, site: Site) -> torch.Tensor | None:
    owner = graph.root.get_submodule(site.owner) if site.owner else graph.root
    t = getattr(owner, site.weight, None)
    return t if isinstance(t, torch.Tensor) else None


def _eligible(ctx: ScoreContext, scope: str) -> tuple[dict[int, list[Consumer]], dict[int, str]]:
    todo: dict[int, list[Consumer]] = {}
    skipped: dict[int, str] = {}
    for g in ctx.groups:
        makers = [s for s, _ in producers(ctx.graph, g) if s.kind in ("conv", "linear", "linearT", "convT")]
        if scope == "inner" and len(makers) != 1:
            skipped[g.id] = (f"{len(makers)} layers produce these channels (a residual stream); ThiNet prunes a layer's "
                             "own filters only (scope='all' scores them too)" if makers else
                             "no conv or linear produces these channels (scope='all' scores them too)")
            continue
        cons = consumers(ctx.graph, g)
        if not cons:
            skipped[g.id] = "no conv or linear consumes these channels: no output to reconstruct"
            continue
        transposed = [s for s, _ in cons if s.kind == "linearT"]
        if transposed:
            skipped[g.id] = (f"consumer {transposed[0].owner or transposed[0].node} is an addmm with an (in, out) weight "
                             "(GPT-2's Conv1D); ThiNet's contributions are written for conv and linear layers")
            continue
        bad = [s for s, _ in cons if s.kind == "conv" and not s.padding]
        if bad:
            skipped[g.id] = f"consumer {bad[0].owner or bad[0].node} pads with something other than explicit zeros"
            continue
        out = []
        for s, mem in cons:
            w = _weight(ctx.graph, s)
            if w is None or not w.is_floating_point() or w.dim() < 2:
                out = []
                skipped[g.id] = f"consumer {s.owner or s.node} has no floating weight to read"
                break
            out.append(Consumer(s, mem, g.size, w))
        if out:
            todo[g.id] = out
    return todo, skipped


def collect_grams(ctx: ScoreContext, todo: dict[int, list[Consumer]], per_image: int, seed: int) -> dict[int, np.ndarray]:
    """One pass over the calibration data: ``G = sum X^T X`` per group (float64, streaming)."""
    grams = {gid: torch.zeros(cs[0].size, cs[0].size, dtype=torch.float64) for gid, cs in todo.items()}
    by_site: dict[str, list[tuple[int, Consumer]]] = {}
    for gid, cs in todo.items():
        for c in cs:
            by_site.setdefault(c.site.node, []).append((gid, c))
    watch = {cs[0][1].site.input for cs in by_site.values()}
    gen = torch.Generator().manual_seed(seed)

    def visit(acts, _grads, _labels):
        for node, users in by_site.items():
            site = users[0][1].site
            act = acts.get(site.input)
            if act is None:
                continue
            weight = users[0][1].weight
            n, o, pos = sample_positions(site, weight, act, per_image, gen)
            full = contributions(site, weight, act, n, o, pos)
            for gid, c in users:
                X = _group_x(c, full).double()
                grams[gid].addmm_(X.T, X)

    record(ctx.graph, ctx.calibration, watch, visit, progress=ctx.progress)
    return {gid: G.numpy() for gid, G in grams.items()}


def _run(ctx: ScoreContext, order_of, least_first: bool, samples_per_image: int, scale: bool, scope: str, ridge: float,
         seed: int) -> Scores:
    todo, skipped = _eligible(ctx, scope)
    out = Scores({}, skipped)
    if not todo:
        return out
    grams = collect_grams(ctx, todo, samples_per_image, seed)
    for gid, G in grams.items():
        if not np.isfinite(G).all():
            out.skipped[gid] = "non-finite activations or weights in the calibration pass"
            continue
        out.scores[gid] = _gram.ranks(order_of(G), least_first)

    if scale:
        def fold(gid: int, keep: np.ndarray):
            G = grams.get(gid)
            if G is None or not G.diagonal().any():
                return None
            keep = np.asarray(keep, dtype=np.int64)
            w = _gram.least_squares(G, keep, ridge)
            if not np.isfinite(w).all():
                return None
            f = np.zeros((len(keep), G.shape[0]))
            f[np.arange(len(keep)), keep] = w
            return f

        out.fold = fold
    return out


@register_method("thinet", "ThiNet (ICCV): greedy removal of the channels the next layer misses least, "
                 "least-squares rescaling", paper=ICCV, needs=("data",), options=OPTIONS)
def thinet(ctx: ScoreContext, samples_per_image: int, scale: bool, scope: str, ridge: float, seed: int):
    """Luo et al., ICCV 2017. Scores are the greedy removal order (eq. 6) on the sampled contributions
    of each channel to its consumers' outputs; ``scale`` folds the least-squares scales of the kept
    channels into the consumers. ``ratio`` is the fraction removed (ThiNet's compress_rate is kept)."""
    return _run(ctx, _gram.backward_order, True, samples_per_image, scale, scope, ridge, seed)


@register_method("thinet-forward", "ThiNet (TPAMI): forward selection with least-squares refit (OMP), "
                 "least-squares rescaling", paper=TPAMI, needs=("data",), options=OPTIONS)
def thinet_forward(ctx: ScoreContext, samples_per_image: int, scale: bool, scope: str, ridge: float, seed: int):
    """Luo et al., TPAMI 2018. Channels are picked one at a time, each maximising the reduction of the
    least-squares residual of the consumers' outputs; the first picked scores highest. Same
    statistics, options and fold as ``thinet``; ``ratio`` is the fraction removed."""
    return _run(ctx, lambda G: _gram.forward_order(G, ridge), False, samples_per_image, scale, scope, ridge, seed)
