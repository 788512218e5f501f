"""Mixture-of-Experts models (tiny random Mixtral and Qwen2-MoE from ``tests/hf_models.py``): the fused
experts' neurons, the attention heads and the hidden size are prunable.

Transformers keeps every expert in 3-D parameters (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)
and ``torch.export`` records the experts as ``transformers::grouped_mm_fallback`` (``rules/moe.py``):
neuron ``i`` of every expert is one channel (one group of size ``I`` per layer), the router reads the
hidden size and is never pruned on its output (the experts keep their numbers, routing is unchanged).
Each model is traced and pruned once per module (``torch.export`` takes a few seconds).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import surgery  # noqa: E402
from surgery.dependency_graph.reasons import Reason  # noqa: E402
from surgery.hf import NonUniformWidths, layer_widths  # noqa: E402
from surgery.pipeline import run  # noqa: E402
from surgery.rewrite import apply_to_graph  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_models import MOE_MODELS, VOCAB, example_inputs  # noqa: E402

EXPERTS, INTER, HIDDEN, LAYERS = 4, 32, 64, 2
#: model -> shared expert's intermediate size (None: no shared expert)
SHARED = {"mixtral": None, "qwen2_moe": 64}
#: config attribute holding the experts' intermediate size
EXPERT_WIDTH = {"mixtral": "intermediate_size", "qwen2_moe": "moe_intermediate_size"}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _run(model, x, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run(model, x, "group-l1", 0.5, **options)
    return res, [str(w.message) for w in caught if "surgery" in str(w.message)]


@pytest.fixture(scope="module", params=list(MOE_MODELS))
def traced(request):
    name = request.param
    model, x = MOE_MODELS[name](), example_inputs(name)
    return name, model, x, surgery.trace(model, x)


@pytest.fixture(scope="module", params=list(MOE_MODELS))
def masked_pair(request):
    """Cross-channel groups (the hidden size, under RMSNorm) skipped: pruned == masked."""
    name = request.param
    model, x = MOE_MODELS[name](), example_inputs(name)
    res, warned = _run(model, x, skip_cross_channel=True)
    return name, model, x, res, warned


@pytest.fixture(scope="module", params=list(MOE_MODELS))
def hidden_pruned(request):
    """Every group, hidden size included, with no round_to: the HF fitter keeps the experts' neurons and
    the hidden size at multiples of 4 floats (the grouped-mm kernel reads rows of a multiple of 16
    bytes) and the same in every layer, so a stock config describes the model."""
    name = request.param
    model, x = MOE_MODELS[name](), example_inputs(name)
    res, warned = _run(model, x, policy="uniform")  # the fitter keeps the experts' widths aligned
    return name, model, x, res, warned


def _group_with(graph, name: str, dim: int):
    [g] = [g for g in graph.groups if (name, dim) in {(m.name, m.dim) for m in g.members}]
    return g


def _members(group) -> set[tuple[str, int]]:
    return {(m.name, m.dim) for m in group.members}


def test_experts_heads_and_hidden_are_groups(traced):
    name, model, x, graph = traced
    assert graph.frontend == "export"
    assert any("grouped_mm_fallback" in str(n.target) for n in graph.fx_graph.nodes)
    for layer in range(LAYERS):
        pre = f"model.layers.{layer}"
        heads = _group_with(graph, f"{pre}.self_attn.k_proj.weight", 0)  # GQA: one unit per KV head
        assert heads.prunable and not heads.cross_channel and heads.size == 2
        assert {(f"{pre}.self_attn.q_proj.weight", 0), (f"{pre}.self_attn.v_proj.weight", 0),
                (f"{pre}.self_attn.o_proj.weight", 1)} <= _members(heads)
        widths = {m.name: {len(ix) for ix in m.index_map()} for m in heads.members}
        assert widths[f"{pre}.self_attn.q_proj.weight"] == {32} and widths[f"{pre}.self_attn.k_proj.weight"] == {16}

        experts = _group_with(graph, f"{pre}.mlp.experts.gate_up_proj", 1)  # neuron i of every expert
        assert experts.prunable and experts.size == INTER
        assert _members(experts) == {(f"{pre}.mlp.experts.gate_up_proj", 1), (f"{pre}.mlp.experts.down_proj", 2)}
        by_name = {m.name: m.index_map() for m in experts.members}
        assert by_name[f"{pre}.mlp.experts.gate_up_proj"] == [[i, INTER + i] for i in range(INTER)]  # gate and up rows
        assert by_name[f"{pre}.mlp.experts.down_proj"] == [[i] for i in range(INTER)]

        if SHARED[name]:
            shared = _group_with(graph, f"{pre}.mlp.shared_expert.gate_proj.weight", 0)
            assert shared.prunable and shared.size == SHARED[name]
            assert _members(shared) == {(f"{pre}.mlp.shared_expert.{p}.weight", d)
                                        for p, d in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1))}

        for param in ("gate_up_proj", "down_proj"):  # the expert dim: the router numbers the experts
            g = _group_with(graph, f"{pre}.mlp.experts.{param}", 0)
            assert not g.prunable and g.reason is Reason.FIXED_DIM
            assert g.reason_detail.endswith("(an expert index: the router's top-k ids number the experts, "
                                            "removing one re-routes tokens)")
        router = _group_with(graph, f"{pre}.mlp.gate.weight", 0)
        assert not router.prunable and router.reason is Reason.FIXED_DIM
        assert "(top-k picks among the entries of dim 1 by index (topk" in router.reason_detail

    hid = _group_with(graph, "model.embed_tokens.weight", 1)
    assert hid.prunable and hid.cross_channel and hid.size == HIDDEN
    for layer in range(LAYERS):
        pre = f"model.layers.{layer}.mlp"
        want = {(f"{pre}.gate.weight", 1), (f"{pre}.experts.gate_up_proj", 2), (f"{pre}.experts.down_proj", 1)}
        if SHARED[name]:
            want |= {(f"{pre}.shared_expert_gate.weight", 1), (f"{pre}.shared_expert.down_proj.weight", 0)}
        assert want <= _members(hid)


def _router_choices(model, ids) -> list[torch.Tensor]:
    out = model(ids, output_router_logits=True)
    return [logits.topk(2, dim=-1).indices for logits in out.router_logits]


def test_pruned_equals_masked_any_batch_and_length(masked_pair):
    name, model, x, res, _ = masked_pair
    pruned = res.model
    assert type(pruned) is type(model)
    state = pruned.state_dict()
    for layer in range(LAYERS):
        pre = f"model.layers.{layer}"
        assert state[f"{pre}.mlp.experts.gate_up_proj"].shape == (EXPERTS, INTER, HIDDEN)  # 2 x 16 neurons
        assert state[f"{pre}.mlp.experts.down_proj"].shape == (EXPERTS, HIDDEN, INTER // 2)
        assert state[f"{pre}.mlp.gate.weight"].shape == (EXPERTS, HIDDEN)
        assert state[f"{pre}.self_attn.q_proj.weight"].shape == (32, HIDDEN)  # one KV head (2 query heads) of 2
        assert state[f"{pre}.self_attn.k_proj.weight"].shape == (16, HIDDEN)
        if SHARED[name]:
            assert state[f"{pre}.mlp.shared_expert.gate_proj.weight"].shape == (SHARED[name] // 2, HIDDEN)
    masked = apply_to_graph(res.graph, res.plan, "mask", "module", model)
    other = example_inputs(name, batch=2, seq=11, seed=1)
    with torch.no_grad():
        for ids in (x[0], other[0]):
            got, want = pruned(ids).logits, masked(ids).logits
            assert got.shape == (*ids.shape, VOCAB) and _rel(got, want) < 1e-4
            for a, b in zip(_router_choices(pruned, ids), _router_choices(masked, ids), strict=True):
                assert a.shape == (ids.numel(), 2) and torch.equal(a, b)
    fresh = MOE_MODELS[name]()  # the user's model is untouched
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())


def test_config_describes_the_pruned_experts(masked_pair, tmp_path):
    name, model, x, res, warned = masked_pair
    pruned = res.model
    widths = layer_widths(pruned)
    for layer in range(LAYERS):
        w = widths[f"model.layers.{layer}"]
        assert w["experts_intermediate"] == INTER // 2 and w["kv_heads"] == 1 and w["heads"] == 2
        assert w.get("shared_intermediate") == (SHARED[name] // 2 if SHARED[name] else None)
    if name == "qwen2_moe":  # no head_dim in Qwen2MoeConfig: heads x head size must be the hidden size
        reason = "this config ties head_dim to hidden_size / heads (64 / 2 != 16)"
        assert any(reason in w for w in warned)
        with pytest.raises(NonUniformWidths, match=r"^cannot save_pretrained: " + reason.replace("(", r"\(").replace(")", r"\)")):
            pruned.save_pretrained(tmp_path)
        return
    assert not warned
    cfg = pruned.config
    assert getattr(cfg, EXPERT_WIDTH[name]) == INTER // 2 and cfg.num_key_value_heads == 1 and cfg.num_attention_heads == 2
    assert model.config.intermediate_size == INTER  # the user's config is untouched
    _reload_identical(pruned, name, tmp_path)


def _reload_identical(pruned, name, path) -> None:
    pruned.save_pretrained(path)
    again = type(pruned).from_pretrained(path).eval()
    with torch.no_grad():
        for batch, seq in ((1, 8), (3, 5)):
            ids = example_inputs(name, batch=batch, seq=seq, seed=2)[0]
            got, want = again(ids).logits, pruned(ids).logits
            assert got.shape == (batch, seq, VOCAB) and torch.equal(got, want)


def test_hidden_pruned_keeps_class_and_round_trips(hidden_pruned, tmp_path):
    name, model, x, res, warned = hidden_pruned
    pruned = res.model
    assert type(pruned) is type(model) and not warned
    cfg, state = pruned.config, pruned.state_dict()
    hidden = state["model.embed_tokens.weight"].shape[1]
    inter = getattr(cfg, EXPERT_WIDTH[name])
    assert cfg.hidden_size == hidden < HIDDEN and hidden % 4 == 0 and inter < INTER and inter % 4 == 0
    for layer in range(LAYERS):
        pre = f"model.layers.{layer}.mlp"
        assert state[f"{pre}.experts.gate_up_proj"].shape == (EXPERTS, 2 * inter, hidden)
        assert state[f"{pre}.experts.down_proj"].shape == (EXPERTS, hidden, inter)
        assert state[f"{pre}.gate.weight"].shape == (EXPERTS, hidden)
        if SHARED[name]:
            assert state[f"{pre}.shared_expert.gate_proj.weight"].shape == (cfg.shared_expert_intermediate_size, hidden)
            assert cfg.shared_expert_intermediate_size < SHARED[name]
    with torch.no_grad():
        ids = example_inputs(name, batch=2, seq=11, seed=1)[0]
        assert pruned(ids).logits.shape == (2, 11, VOCAB)
    _reload_identical(pruned, name, tmp_path)


@pytest.mark.parametrize("impl, dtype, tol", [("batched_mm", torch.float32, 1e-4), ("grouped_mm", torch.bfloat16, 2e-2)])
def test_other_expert_kernels(impl, dtype, tol):
    """``batched_mm`` (experts' weights gathered per token, ``bmm``) and bf16 weights (export records
    ``aten._grouped_mm``): the same groups, and pruned == masked."""
    model = MOE_MODELS["mixtral"]().to(dtype)
    model.set_experts_implementation(impl)
    x = example_inputs("mixtral")
    res, _ = _run(model, x, skip_cross_channel=True)
    if dtype == torch.bfloat16:
        assert any(n.target is torch.ops.aten._grouped_mm.default for n in res.graph.fx_graph.nodes)
    for layer in range(LAYERS):
        pre = f"model.layers.{layer}.mlp.experts"
        g = _group_with(res.graph, f"{pre}.gate_up_proj", 1)
        assert g.prunable and _members(g) == {(f"{pre}.gate_up_proj", 1), (f"{pre}.down_proj", 2)}
        assert res.model.state_dict()[f"{pre}.down_proj"].shape == (EXPERTS, HIDDEN, INTER // 2)
    masked = apply_to_graph(res.graph, res.plan, "mask", "module", model)
    ids = example_inputs("mixtral", batch=2, seq=11, seed=1)[0]
    with torch.no_grad():
        assert _rel(res.model(ids).logits.float(), masked(ids).logits.float()) < tol
