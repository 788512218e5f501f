"""Custom zoo: one tiny module per tricky pruning case, with exact expected pruned shapes.

Every case is planned with ``l1`` at ratio 0.5 through ``check_pruned_equals_masked`` (output shapes
kept, pruned == masked, fewer params, user's model untouched, re-traceable); then the exact shapes
(and size attributes) of the pruned model are checked, and the groups that touch the model's inputs
and outputs must be left whole with a reason. Case-specific structure (cat branches, split parts,
cross-channel flags, whole GroupNorm groups, attention heads, recurrent hidden sizes) has its own
tests below the zoo, followed by a dead-channel oracle and plan-level checks.
"""

from __future__ import annotations

import operator
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import check_pruned_equals_masked, rel_err  # noqa: E402

import surgery  # noqa: E402
from surgery import Reason  # noqa: E402
from zoo_models import BY_NAME, CASE_IDS, CASES, Case  # noqa: E402
from zoo_models import build_case as _build  # noqa: E402
from zoo_models import forward as _out  # noqa: E402

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _groups_with(graph, module: str, param: str, dim: int):
    return [g for g in graph.groups if any(m.module == module and m.param == param and m.dim == dim for m in g.members)]


def _member(group, module: str, param: str, dim: int):
    found = [m for m in group.members if m.module == module and m.param == param and m.dim == dim]
    assert len(found) == 1, f"group {group.id} has {len(found)} members {module}.{param}[dim {dim}]"
    return found[0]


def _only_group(graph, module: str, param: str, dim: int):
    gs = _groups_with(graph, module, param, dim)
    assert len(gs) == 1, f"{module}.{param}[dim {dim}] is in {len(gs)} groups"
    return gs[0]


def _plan_group(plan, gid):
    return next((g for g in plan.groups if g.id == gid), None)


# ---------------------------------------------------------------------------------------------
# zoo tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_zoo_pruned_shapes_and_invariant(case: Case):
    model, x = _build(case)
    plan, pruned, masked = check_pruned_equals_masked(model, x, "group-l1", 0.5)
    if case.prunes:
        assert plan.groups, "nothing was pruned:\n" + "\n".join(str(g) for g in surgery.trace(model, x).groups)
    else:
        assert plan.groups == ()
    for path, shape in case.expect.items():
        got = tuple(operator.attrgetter(path)(pruned).shape)
        assert got == shape, f"{path}: expected {shape}, got {got}"
    for path, value in case.attrs.items():
        got = operator.attrgetter(path)(pruned)
        got = tuple(got) if isinstance(got, (list, tuple, torch.Size)) else got
        assert got == value, f"{path}: expected {value!r}, got {got!r}"
    # the pruned model also runs on a fresh batch of the same shape
    y = _out(pruned, torch.randn(*case.shape))
    assert all(torch.isfinite(t).all() for t in (y if isinstance(y, tuple) else (y,)))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_zoo_input_output_groups_not_prunable(case: Case):
    model, x = _build(case)
    graph = surgery.trace(model, x)
    assert case.inputs and case.outputs
    for loc, reason in [(loc, Reason.MODEL_INPUT) for loc in case.inputs] + [(loc, Reason.MODEL_OUTPUT) for loc in case.outputs]:
        groups = _groups_with(graph, *loc)
        assert groups, f"no group has member {loc}"
        for g in groups:
            assert not g.prunable, f"group {g.id} with {loc} touches a model {reason.name} but is prunable"
            assert g.reason == reason, f"group {g.id} with {loc}: reason {g.reason} (expected {reason})"
            assert g.why and reason.value in g.why


# ---------------------------------------------------------------------------------------------
# case-specific structure
# ---------------------------------------------------------------------------------------------


def test_grouped_conv_removes_same_positions_in_every_group():
    for groups in (2, 4):
        model, x = _build(BY_NAME[f"grouped_conv_g{groups}"])
        graph = surgery.trace(model, x)
        per_group = 16 // groups
        g_in = _only_group(graph, "conv1", "weight", 0)
        assert g_in.prunable and g_in.size == per_group
        m = _member(g_in, "conv1", "weight", 0)
        # channel c and c + per_group (same position in another conv group) are one unit
        assert np.array_equal(m.units[np.argsort(m.indices)], np.arange(16) % per_group)
        g_out = _only_group(graph, "gconv", "weight", 0)
        assert g_out.prunable and g_out.size == per_group and g_out is not g_in
        plan = surgery.plan(model, x, ratio=0.5)
        pruned = surgery.apply(model, plan)
        assert pruned.gconv.groups == groups


def test_depthwise_multiplier_unit_owns_output_block():
    model, x = _build(BY_NAME["depthwise_multiplier2"])
    graph = surgery.trace(model, x)
    g = _only_group(graph, "conv1", "weight", 0)
    assert g.size == 8 and g.prunable
    dw = _member(g, "dw", "weight", 0)
    assert np.array_equal(dw.units[np.argsort(dw.indices)], np.arange(16) // 2)
    assert _groups_with(graph, "dw", "weight", 0) == [g]


def test_layernorm_group_is_cross_channel():
    model, x = _build(BY_NAME["layernorm"])
    graph = surgery.trace(model, x)
    g = _only_group(graph, "ln", "weight", 0)
    assert g.prunable and g.size == 8
    assert g.cross_channel, "LayerNorm group must be flagged cross-channel"
    assert _only_group(graph, "fc1", "weight", 0) is g
    assert not _only_group(graph, "fc2", "weight", 0).cross_channel
    # not skipping it prunes LayerNorm too (approximate by design): shapes are still consistent
    plan = surgery.plan(model, x, ratio=0.5, skip_cross_channel=False)
    assert _plan_group(plan, g.id) is not None
    pruned = surgery.apply(model, plan)
    assert tuple(pruned.ln.normalized_shape) == (4,) and pruned.ln.weight.shape == (4,)
    assert pruned.fc1.weight.shape == (4, 6)
    assert _out(pruned, x).shape == _out(model, x).shape


def test_groupnorm_prunes_whole_groups():
    model, x = _build(BY_NAME["groupnorm_g4"])
    graph = surgery.trace(model, x)
    g = _only_group(graph, "gn", "weight", 0)
    assert g.prunable and not g.cross_channel and g.size == 4
    m = _member(g, "gn", "weight", 0)
    assert np.array_equal(m.units[np.argsort(m.indices)], np.arange(8) // 2)
    plan, pruned, masked = check_pruned_equals_masked(model, x, "group-l1", 0.5)
    removed = _plan_group(plan, g.id).removed
    assert len(removed) == 2
    # exactness on the GroupNorm output itself: kept channels equal the masked model's
    kept_channels = [c for c in range(8) if c // 2 not in removed]
    with torch.no_grad():
        a = pruned.gn(pruned.conv1(x))
        b = masked.gn(masked.conv1(x))[:, kept_channels]
    assert rel_err(a, b) < 1e-5


def test_groupnorm_one_group_is_cross_channel():
    model, x = _build(BY_NAME["groupnorm_g1_cross_channel"])
    g = _only_group(surgery.trace(model, x), "gn", "weight", 0)
    assert g.prunable and g.cross_channel


def test_softmax_over_channels_is_cross_channel():
    model, x = _build(BY_NAME["softmax_channels"])
    graph = surgery.trace(model, x)
    g1 = _only_group(graph, "conv1", "weight", 0)
    assert g1.cross_channel and "softmax" in g1.cross_channel.lower()
    g2 = _only_group(graph, "conv2", "weight", 0)
    assert g2.prunable and not g2.cross_channel


def test_cat_channels_each_branch_is_its_own_group():
    model, x = _build(BY_NAME["cat_channels"])
    graph = surgery.trace(model, x)
    ga = _only_group(graph, "conv_a", "weight", 0)
    gb = _only_group(graph, "conv_b", "weight", 0)
    assert ga is not gb and ga.prunable and gb.prunable
    assert (ga.size, gb.size) == (8, 6)
    assert sorted(_member(ga, "conv2", "weight", 1).indices.tolist()) == list(range(8))
    assert sorted(_member(gb, "conv2", "weight", 1).indices.tolist()) == list(range(8, 14))


def test_cat_spatial_branches_share_one_group():
    model, x = _build(BY_NAME["cat_spatial"])
    graph = surgery.trace(model, x)
    g = _only_group(graph, "conv_a", "weight", 0)
    assert _only_group(graph, "conv_b", "weight", 0) is g
    assert _only_group(graph, "conv2", "weight", 1) is g
    assert g.size == 8 and g.prunable


def test_split_unequal_parts_are_separate_groups():
    model, x = _build(BY_NAME["split_unequal"])
    graph = surgery.trace(model, x)
    groups = _groups_with(graph, "conv1", "weight", 0)
    assert sorted(g.size for g in groups) == [3, 5]
    by_size = {g.size: g for g in groups}
    assert sorted(_member(by_size[3], "conv1", "weight", 0).indices.tolist()) == [0, 1, 2]
    assert sorted(_member(by_size[5], "conv1", "weight", 0).indices.tolist()) == [3, 4, 5, 6, 7]
    assert _only_group(graph, "conv_a", "weight", 1) is by_size[3]
    assert _only_group(graph, "conv_b", "weight", 1) is by_size[5]


def test_getitem_slice_dead_channels():
    model, x = _build(BY_NAME["getitem_slice"])
    graph = surgery.trace(model, x)
    groups = _groups_with(graph, "conv1", "weight", 0)
    assert sorted(g.size for g in groups) == [4, 4]
    read = _only_group(graph, "conv2", "weight", 1)
    assert sorted(_member(read, "conv1", "weight", 0).indices.tolist()) == [0, 1, 2, 3]


def test_flatten_linear_channel_owns_spatial_block():
    model, x = _build(BY_NAME["flatten_linear"])
    graph = surgery.trace(model, x)
    g = _only_group(graph, "conv1", "weight", 0)
    fc = _member(g, "fc", "weight", 1)
    assert g.size == 8
    assert np.array_equal(fc.units[np.argsort(fc.indices)], np.arange(128) // 16)


def test_channel_shuffle_units():
    model, x = _build(BY_NAME["channel_shuffle"])
    graph = surgery.trace(model, x)
    g = _only_group(graph, "conv1", "weight", 0)
    assert g.prunable and g.size == 4
    c1 = _member(g, "conv1", "weight", 0).index_map()
    c2 = _member(g, "conv2", "weight", 1).index_map()
    # shuffled channel 2u + k is original channel k*4 + u
    for u in range(4):
        assert sorted(c1[u]) == sorted(k * 4 + (c2[u][0] // 2) for k in range(2))
        assert sorted(c2[u]) == [2 * (c2[u][0] // 2), 2 * (c2[u][0] // 2) + 1]


@pytest.mark.parametrize("name", ["multihead_attention", "multihead_attention_index0"])
def test_multihead_attention_pruned_by_whole_heads(name):
    model, x = _build(BY_NAME[name])
    graph = surgery.trace(model, x)
    g = _only_group(graph, "attn", "in_proj_weight", 1)
    assert g.prunable and g.size == 4  # 4 heads of head_dim 4
    plan, pruned, _ = check_pruned_equals_masked(model, x, "group-l1", 0.5)
    removed = _plan_group(plan, g.id).removed
    assert len(removed) == 2
    attn = pruned.get_submodule("attn")
    assert attn.num_heads == 2 and attn.embed_dim == 8 and attn.head_dim == 4
    # the kept embedding channels are whole heads
    m = _member(g, "proj", "weight", 0)
    kept = sorted(i for i, u in zip(m.indices.tolist(), m.units.tolist()) if u not in removed)
    assert len(kept) == 8 and all(len({c // 4 for c in kept[i:i + 4]}) == 1 for i in (0, 4))


@pytest.mark.parametrize("name,rnn,gates", [("gru", "gru", 3), ("lstm_2layer", "lstm", 4)])
def test_rnn_hidden_size_pruned(name, rnn, gates):
    model, x = _build(BY_NAME[name])
    graph = surgery.trace(model, x)
    g = _only_group(graph, rnn, "weight_hh_l0", 1)
    assert g.prunable and g.size == 16
    _, pruned, _ = check_pruned_equals_masked(model, x, "group-l1", 0.5)
    mod = pruned.get_submodule(rnn)
    assert mod.hidden_size == 8
    assert mod.weight_hh_l0.shape == (gates * 8, 8)
    y, _ = mod(torch.randn(2, 5, mod.input_size))
    assert y.shape == (2, 5, 8)
