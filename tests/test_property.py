"""Property tests: hypothesis draws random DAG convnets and checks the core law pruned == masked.

A graph spec is plain data: a tuple of ops, each op a tuple whose first item names it and whose
integer arguments index earlier tensors (tensor 0 is the model input, every op appends its
outputs). ``SpecNet`` builds itself from a spec; its forward walks the fixed spec, so torch.fx
unrolls the loop. Set ``SURGERY_HYPOTHESIS_EXAMPLES`` to run more examples (default 60).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import surgery
from helpers import check_pruned_equals_masked, n_params  # tests/ is on sys.path (pytest rootdir insertion)

IN_CH, SIZE, BATCH, N_CLASSES = 3, 8, 2, 5
SETTINGS = settings(
    max_examples=int(os.environ.get("SURGERY_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _shapes(spec) -> list[tuple[int, int]]:
    """(channels, spatial) of every tensor the spec produces, input first (head excluded)."""
    shp = [(IN_CH, SIZE)]
    for op in spec:
        kind = op[0]
        if kind == "conv":  # ("conv", src, out, kernel, groups)
            shp.append((op[2], shp[op[1]][1]))
        elif kind == "dwconv":  # ("dwconv", src, kernel)
            shp.append(shp[op[1]])
        elif kind in ("bn", "act", "se", "add"):  # add: ("add", a, b) -> a's shape
            shp.append(shp[op[1]])
        elif kind == "pool":  # ("pool", src, "max" | "avg"), kernel 2
            shp.append((shp[op[1]][0], shp[op[1]][1] // 2))
        elif kind == "cat":  # ("cat", a, b)
            shp.append((shp[op[1]][0] + shp[op[2]][0], shp[op[1]][1]))
        elif kind == "chunk":  # ("chunk", src, which) with which in 0, 1, 2 (= both halves)
            half = (shp[op[1]][0] // 2, shp[op[1]][1])
            shp.extend([half, half] if op[2] == 2 else [half])
    return shp


@st.composite
def graph_specs(draw):
    n_ops = draw(st.integers(4, 10))
    spec: list[tuple] = []
    for _ in range(n_ops):
        shp = _shapes(spec)
        idx = range(len(shp))
        src = len(shp) - 1 - draw(st.integers(0, min(2, len(shp) - 1)))  # mostly a chain, some dead ends
        s = shp[src][1]
        kinds = ["conv"] * 3 + ["dwconv", "bn", "act", "add", "cat", "se"]  # convs make prunable groups
        even = [i for i in idx if shp[i][0] % 2 == 0]
        if even:
            kinds += ["gconv", "chunk"]
        if s >= 4:
            kinds.append("pool")
        kind = draw(st.sampled_from(kinds))
        if kind == "conv":
            spec.append(("conv", src, draw(st.integers(2, 12)), draw(st.sampled_from([1, 3])), 1))
        elif kind == "gconv":
            src = draw(st.sampled_from(even))
            spec.append(("conv", src, 2 * draw(st.integers(1, 6)), draw(st.sampled_from([1, 3])), 2))
        elif kind == "dwconv":
            spec.append(("dwconv", src, draw(st.sampled_from([1, 3]))))
        elif kind == "bn":
            spec.append(("bn", src))
        elif kind == "act":
            spec.append(("act", src, draw(st.sampled_from(["relu", "silu", "sigmoid"]))))
        elif kind == "pool":
            spec.append(("pool", src, draw(st.sampled_from(["max", "avg"]))))
        elif kind == "se":
            spec.append(("se", src))
        elif kind == "chunk":
            spec.append(("chunk", draw(st.sampled_from(even)), draw(st.sampled_from([0, 1, 2]))))
        else:  # add / cat: partner of the same spatial size (adapter 1x1 conv for add if channels differ)
            other = draw(st.sampled_from([i for i in idx if shp[i][1] == s]))
            spec.append((kind, src, other))
    head = draw(st.sampled_from(["flatten", "gap"]))
    return tuple(spec) + (("head", len(_shapes(spec)) - 1, head),)


def _randomize_bn(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.running_mean.normal_(0.0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.3)


class SpecNet(nn.Module):
    """A convnet built from a graph spec; forward walks the spec (fx-traceable, no data-dependent flow)."""

    def __init__(self, spec, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.spec = spec
        shp = _shapes(spec[:-1])
        L = self.layers = nn.ModuleDict()
        for i, op in enumerate(spec):
            kind, key = op[0], f"op{i}"
            if kind == "conv":
                cin, k = shp[op[1]][0], op[3]
                L[key] = nn.Conv2d(cin, op[2], k, padding=k // 2, groups=op[4])
            elif kind == "dwconv":
                cin, k = shp[op[1]][0], op[2]
                L[key] = nn.Conv2d(cin, cin, k, padding=k // 2, groups=cin)
            elif kind == "bn":
                L[key] = nn.BatchNorm2d(shp[op[1]][0])
                _randomize_bn(L[key])
            elif kind == "act":
                L[key] = {"relu": nn.ReLU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid}[op[2]]()
            elif kind == "pool":
                L[key] = nn.MaxPool2d(2) if op[2] == "max" else nn.AvgPool2d(2)
            elif kind == "se":
                c = shp[op[1]][0]
                L[key] = nn.Conv2d(c, c, 1)
            elif kind == "add" and shp[op[1]][0] != shp[op[2]][0]:
                L[key] = nn.Conv2d(shp[op[2]][0], shp[op[1]][0], 1)
            elif kind == "head":
                c, s = shp[op[1]]
                L[key] = nn.Linear(c * s * s if op[2] == "flatten" else c, N_CLASSES)

    def forward(self, x):
        ts = [x]
        for i, op in enumerate(self.spec):
            kind, key = op[0], f"op{i}"
            if kind in ("conv", "dwconv", "bn", "act", "pool"):
                ts.append(self.layers[key](ts[op[1]]))
            elif kind == "se":
                t = ts[op[1]]
                ts.append(t * torch.sigmoid(self.layers[key](F.adaptive_avg_pool2d(t, 1))))
            elif kind == "add":
                b = self.layers[key](ts[op[2]]) if key in self.layers else ts[op[2]]
                ts.append(ts[op[1]] + b)
            elif kind == "cat":
                ts.append(torch.cat([ts[op[1]], ts[op[2]]], dim=1))
            elif kind == "chunk":
                parts = ts[op[1]].chunk(2, dim=1)  # a Proxy under fx: index it, never iterate it
                ts.extend([parts[0], parts[1]] if op[2] == 2 else [parts[op[2]]])
            elif kind == "head":
                t = ts[op[1]]
                t = torch.flatten(t, 1) if op[2] == "flatten" else t.mean(dim=(2, 3))
                return self.layers[key](t)
        raise AssertionError("spec has no head")


def _model_and_input(spec, seed):
    model = SpecNet(spec, seed).eval()
    x = torch.randn(BATCH, IN_CH, SIZE, SIZE, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


@SETTINGS
@given(spec=graph_specs(), seed=st.integers(0, 2**16), ratio=st.floats(0.1, 0.7))
def test_random_dag_pruned_equals_masked(spec, seed, ratio):
    model, x = _model_and_input(spec, seed)
    graph = surgery.trace(model, x)
    prunable = any(g.prunable and not g.cross_channel and int(ratio * g.size) > 0 for g in graph.groups)
    check_pruned_equals_masked(model, x, "random", ratio, 1e-4, expect_fewer_params=prunable, seed=seed)
    check_pruned_equals_masked(model, x, "group-l1", ratio, 1e-4, expect_fewer_params=prunable)


@SETTINGS
@given(spec=graph_specs(), seed=st.integers(0, 2**16), method=st.sampled_from(["group-l1", "l1", "random"]))
def test_random_dag_ratio_zero_is_identity(spec, seed, method):
    model, x = _model_and_input(spec, seed)
    plan = surgery.plan(model, x, method=method, ratio=0.0, skip_cross_channel=True)
    assert plan.n_removed == 0
    with torch.no_grad():
        y = model(x)
        for mode in ("prune", "mask"):
            out = surgery.apply(model, plan, mode=mode)
            assert n_params(out) == n_params(model), mode
            z = out(x)
            assert z.shape == y.shape and torch.allclose(z, y, atol=1e-6, rtol=1e-5), mode
