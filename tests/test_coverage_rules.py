"""Ops that kept whole timm / torchvision families below 0.9 of their parameters prunable in the zoo
sweep (issue 6), each on a tiny model of the pattern: ``repeat_interleave`` (GCViT), ``clamp`` with
tensor bounds (Gemma 4's clamped linears), ``pad`` by amounts computed from sizes (DaViT, Swin V2),
a ``Conv1d`` with kernel 1 over ``(B, 3, C)`` (CoaT's aggregate), MViT's ``_unsqueeze``/``_squeeze``
and Swin3D's ``shifted_window_attention_3d``.

Every model takes an ``export`` flag where the op has an aten form: with it, ``forward`` branches on
a shape (fx cannot trace that, so ``torch.export`` takes over). Expected shapes are for ``group-l1``
at ratio 0.5 (``int(0.5 * n)`` channels removed per group) with cross-channel groups skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import check_pruned_equals_masked  # noqa: E402

import surgery  # noqa: E402
from surgery.coverage import coverage  # noqa: E402
from surgery.dependency_graph.rules.common import op_name  # noqa: E402

FRONT_ENDS = pytest.mark.parametrize("export", [True, False], ids=["export", "fx"])


class Base(nn.Module):
    def __init__(self, export: bool = False):
        super().__init__()
        self.export = export

    def branch(self, y):
        if self.export and y.shape[-1] > 1:  # Python control flow on a shape: fx cannot trace it
            y = y * 1.0
        return y


def _check(model, x, shapes: dict[str, tuple], ops=(), blockers=()):
    """Traced by the expected front end with ``ops`` in its graph, every parameter but the output's in
    prunable groups,
    pruned == masked, and the pruned tensors of exactly these shapes."""
    graph = surgery.trace(model, x)
    assert graph.frontend == ("export" if model.export else "fx")
    targets = {str(n.target) if isinstance(n.target, torch._ops.OpOverload) else op_name(n.target)
               for n in graph.fx_graph.nodes if n.op in ("call_function", "call_method")}
    assert set(ops) <= targets, sorted(targets)
    found = [(b.reason, b.op) for b in coverage(graph).blockers]
    assert found == [("MODEL_OUTPUT", "model output"), *blockers]  # else only the output layer's width is fixed
    _, pruned, _ = check_pruned_equals_masked(model, x, "group-l1", 0.5, output="graph")
    got = {k: tuple(v.shape) for k, v in pruned.state_dict().items() if k in shapes}
    assert got == shapes
    return graph, pruned


# -- repeat_interleave ----------------------------------------------------------------------------


class Repeated(Base):
    """Channels repeated in place (each kept channel keeps its 2 copies), and a global query
    repeated over the batch by a count computed from sizes (GCViT)."""

    def __init__(self, export):
        super().__init__(export)
        self.a, self.b = nn.Linear(6, 8), nn.Linear(16, 4)
        self.q = nn.Parameter(torch.randn(1, 8))

    def forward(self, x):
        y = self.branch(self.a(x))  # (B, 8)
        y = y * self.q.repeat_interleave(x.shape[0] // self.q.shape[0], dim=0)
        return self.b(torch.repeat_interleave(y, 2, dim=1))


@FRONT_ENDS
def test_repeat_interleave_repeats_each_kept_channel(export):
    ops = ["aten.repeat_interleave.self_int"] if export else ["repeat_interleave"]
    _check(Repeated(export).eval(), torch.randn(3, 6),
           {"a.weight": (4, 6), "q": (1, 4), "b.weight": (4, 8)}, ops)


# -- clamp with tensor bounds ---------------------------------------------------------------------


class Clamped(Base):
    """Per-channel bounds (buffers of 8) and scalar-tensor bounds (Gemma 4's ``input_min``)."""

    def __init__(self, export):
        super().__init__(export)
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 4)
        self.register_buffer("lo", -torch.rand(8) * 0.2)
        self.register_buffer("hi", torch.rand(8) * 0.2)
        self.register_buffer("lim", torch.tensor(0.15))

    def forward(self, x):
        y = torch.clamp(self.branch(self.a(x)), self.lo, self.hi)
        return self.b(y.clamp(min=-self.lim, max=self.lim) + torch.clamp_min(y, self.lo))


@FRONT_ENDS
def test_clamp_with_tensor_bounds_broadcasts(export):
    ops = ["aten.clamp.Tensor"] if export else []
    _, pruned = _check(Clamped(export).eval(), torch.randn(2, 6),
                       {"a.weight": (4, 6), "lo": (4,), "hi": (4,), "lim": (), "b.weight": (4, 4)}, ops)


class RMSNormed(Base):
    """Gemma 4's norm: ``F.rms_norm`` (``aten.rms_norm`` under export), a channel statistic."""

    def __init__(self, export):
        super().__init__(export)
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 4)
        self.weight = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        return self.b(F.rms_norm(self.branch(self.a(x)), (8,), self.weight, 1e-6))


@FRONT_ENDS
def test_rms_norm_is_a_cross_channel_group(export):
    graph = surgery.trace(RMSNormed(export).eval(), torch.randn(2, 6))
    group = next(g for g in graph.groups if any(m.module == "a" and m.dim == 0 for m in g.members))
    assert group.prunable and group.cross_channel and group.size == 8
    plan = surgery.plan(RMSNormed(export).eval(), torch.randn(2, 6), "group-l1", 0.5)
    assert [len(g.keep) for g in plan.groups] == [4]


# -- pad by amounts computed from sizes -----------------------------------------------------------


class WindowPad(Base):
    """Swin-style: (B, H, W, C) padded to a multiple of the window on H and W, channels by zeros."""

    def __init__(self, export, window=4):
        super().__init__(export)
        self.window = window
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 4)

    def forward(self, x):
        y = self.branch(self.a(x))
        _, h, w, _ = y.shape
        pad_w, pad_h = (self.window - w % self.window) % self.window, (self.window - h % self.window) % self.window
        y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
        return self.b(y[:, :h, :w, :].contiguous())


@FRONT_ENDS
def test_pad_by_computed_amounts_keeps_channels(export):
    _check(WindowPad(export).eval(), torch.randn(1, 5, 6, 3), {"a.weight": (4, 3), "b.weight": (4, 4)})


# -- Conv1d with kernel 1 over a token layout -----------------------------------------------------


class Aggregate(Base):
    """CoaT: three class tokens stacked to (B, 3, C), a ``Conv1d(3, 1, 1)`` mixes them per channel."""

    def __init__(self, export):
        super().__init__(export)
        self.parts = nn.ModuleList(nn.Linear(5, 8) for _ in range(3))
        self.aggregate = nn.Conv1d(3, 1, kernel_size=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.stack([p(x) for p in self.parts], dim=1)  # (B, 3, 8)
        return self.head(self.aggregate(self.branch(y)).squeeze(dim=1))


@FRONT_ENDS
def test_kernel_one_conv1d_passes_its_length_dim(export):
    shapes = {"parts.0.weight": (4, 5), "parts.2.bias": (4,), "aggregate.weight": (1, 3, 1), "head.weight": (4, 4)}
    stack = "stack.default" if export else "stack"  # the 3 scales are a new dim: its entries are not channels
    _check(Aggregate(export).eval(), torch.randn(2, 5), shapes,
           blockers=[("NOT_PRODUCED", stack), ("SINGLE_CHANNEL", "only one-channel dims")])


def test_conv_with_a_wider_kernel_keeps_its_length_dim_fixed():
    """Only kernel 1, stride 1 and no padding pass positions one to one: a kernel of 3 mixes them."""
    model = Aggregate(False).eval()
    model.aggregate = nn.Conv1d(3, 1, kernel_size=3, padding=1)
    cov = coverage(surgery.trace(model, torch.randn(2, 5)))
    assert [(b.reason, b.op) for b in cov.blockers][:1] == [("FIXED_DIM", "Conv1d")]


# -- torchvision's MViT and Swin3D functions ------------------------------------------------------


class MViTPool(Base):
    """MViT's pooling wrapper: (B, N, C) gets a head dim of 1 for pooling, then loses it."""

    def __init__(self):
        super().__init__(False)
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 4)
        self.act = nn.GELU()

    def forward(self, x):
        from torchvision.models.video.mvit import _squeeze, _unsqueeze

        y, rank = _unsqueeze(self.a(x), 4, 1)
        y = self.act(y)
        return self.b(_squeeze(y, 4, 1, rank))


def test_mvit_unsqueeze_and_squeeze_pass_channels():
    shapes = {"a.weight": (4, 3), "b.weight": (4, 4)}
    _check(MViTPool().eval(), torch.randn(2, 5, 3), shapes, ["_unsqueeze", "_squeeze"])


class Swin3dBlock(Base):
    def __init__(self):
        from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d

        super().__init__(False)
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 4)
        self.attn = ShiftedWindowAttention3d(8, [2, 2, 2], [1, 1, 1], num_heads=2)

    def forward(self, x):
        return self.b(self.attn(self.a(x)))


def test_swin3d_window_attention_prunes_whole_heads():
    model = Swin3dBlock().eval()
    x = torch.randn(1, 2, 4, 4, 3)
    shapes = {"a.weight": (4, 3), "attn.qkv.weight": (12, 4), "attn.proj.weight": (4, 4),
              "attn.relative_position_bias_table": (27, 1), "b.weight": (4, 4)}
    _check(model, x, shapes, ["shifted_window_attention_3d"])
    pruned = surgery.prune(model, x, "group-l1", 0.5, skip_cross_channel=True)
    assert type(pruned) is Swin3dBlock and pruned.attn.num_heads == 1


# -- the export front end's time box on symbolic sizes (NASNet) ----------------------------------


class Pooled(Base):
    def __init__(self):
        super().__init__(True)
        self.c1, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.branch(self.c1(x)).mean(dim=(2, 3)))


def test_dynamic_sizes_give_way_to_the_batch_after_the_time_box(monkeypatch):
    from surgery.dependency_graph import exporting

    model, x = Pooled().eval(), torch.randn(1, 3, 8, 8)
    gm = exporting.export_module(model, (x,))  # within the time box: H and W are dynamic too
    assert gm(torch.randn(3, 3, 10, 12)).shape == (3, 4)
    monkeypatch.setattr(exporting, "DYNAMIC_SECONDS", 0.0)
    monkeypatch.setattr(exporting, "_OUT_OF_TIME", set())
    with pytest.warns(UserWarning, match=r"dynamic in the batch only \(batch and other dims: gave up after 0 s"):
        gm = exporting.export_module(model, (x,))
    y = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(gm(y), model(y), atol=1e-6)  # a correct graph, dynamic in the batch
    with pytest.raises(AssertionError, match=r"x.shape\[2\] must be 8"):
        gm(torch.randn(1, 3, 10, 8))
    with pytest.warns(UserWarning, match="gave up after 0 s of tracing with symbolic sizes before, for this class"):
        check_pruned_equals_masked(model, x, "group-l1", 0.5)  # the class is not tried again in this process
