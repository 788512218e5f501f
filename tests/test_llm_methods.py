"""Language-model criteria: wanda-structured, flap, llm-taylor, each by its defining property, on a
tiny token model (embedding -> linear -> ReLU -> linear -> vocabulary) traced by fx: scores equal a
direct computation, a dead channel goes first, FLAP's bias compensation keeps the output's mean
over the calibration tokens (also into a consumer without a bias, which is given one), and pruned ==
masked holds with it. Text calibration and the uniform
policy are checked here too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from surgery.calibration import text_blocks
from surgery.calibration.data import DataError
from surgery.methods import ScoreContext, get_method
from surgery.calibration import Calibration
from surgery.pipeline import run

VOCAB, DIM, HID = 40, 8, 12


class TinyLM(nn.Module):
    """Token ids (batch, seq) -> logits (batch, seq, VOCAB) through one MLP block."""

    def __init__(self, fc2_bias: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.fc1 = nn.Linear(DIM, HID)
        self.fc2 = nn.Linear(HID, DIM, bias=fc2_bias)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        return self.head(h + self.fc2(F.relu(self.fc1(h))))


def _data(n: int = 4, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(x, x) for x in torch.randint(0, VOCAB, (n, 2, 6), generator=g)]


def _kill(model: TinyLM, channel: int) -> TinyLM:
    with torch.no_grad():
        model.fc1.weight[channel] = 0.0
        model.fc1.bias[channel] = -1.0  # ReLU output is exactly 0 on every token
    return model


def _mlp_group(graph) -> int:
    return next(g.id for g in graph.groups if g.prunable and g.size == HID)


def _scores(model, method: str, data, **options) -> np.ndarray:
    x = data[0][0]
    graph = surgery.trace(model, x)
    gid = _mlp_group(graph)
    ctx = ScoreContext(model, graph, [graph.groups[gid]], Calibration(data))
    out = get_method(method).fn(ctx, **get_method(method).resolve(options))
    return out.scores[gid], out


def _hidden_acts(model: TinyLM, data) -> torch.Tensor:
    """fc2's input over every calibration token: (tokens, HID), float64."""
    with torch.no_grad():
        return torch.cat([F.relu(model.fc1(model.embed(x))).reshape(-1, HID) for x, _ in data]).double()


def test_wanda_structured_equals_direct_computation():
    model, data = TinyLM(), _data()
    got, _ = _scores(model, "wanda-structured", data)
    a = _hidden_acts(model, data)
    want = model.fc2.weight.detach().double().abs().sum(0) * a.norm(dim=0)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-10)


def test_flap_score_equals_direct_computation():
    model, data = TinyLM(), _data()
    got, out = _scores(model, "flap", data)
    a = _hidden_acts(model, data)
    want = a.var(0, unbiased=False) * model.fc2.weight.detach().double().square().sum(0)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-8, atol=1e-12)
    gid = next(iter(out.shift))
    np.testing.assert_allclose(out.shift[gid], a.mean(0).numpy(), rtol=1e-10)


def test_llm_taylor_equals_direct_computation():
    """Both estimators of LLM-Pruner: element (sum of |w g|, the default) and vector (|sum of w g|)."""
    model, data = TinyLM(), _data()
    element, _ = _scores(model, "llm-taylor", data)
    vector, _ = _scores(model, "llm-taylor", data, taylor="vector")
    grads = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for x, y in data:
        logits = model(x)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), y[:, 1:].reshape(-1))
        for (n, _), g in zip(model.named_parameters(), torch.autograd.grad(loss, list(model.parameters()))):
            grads[n] += g.double() / len(data)
    wg = {n: p.detach().double() * grads[n] for n, p in model.named_parameters()}
    want = (wg["fc1.weight"].sum(1) + wg["fc1.bias"] + wg["fc2.weight"].sum(0)).abs()
    np.testing.assert_allclose(vector, want.numpy(), rtol=1e-6, atol=1e-12)
    want = wg["fc1.weight"].abs().sum(1) + wg["fc1.bias"].abs() + wg["fc2.weight"].abs().sum(0)
    np.testing.assert_allclose(element, want.numpy(), rtol=1e-6, atol=1e-12)
    assert (element >= vector - 1e-12).all() and not np.allclose(element, vector)


@pytest.mark.parametrize("method", ["wanda-structured", "flap", "llm-taylor"])
def test_dead_channel_goes_first(method):
    model, data = _kill(TinyLM(), 5), _data()
    scores, _ = _scores(model, method, data)
    assert scores[5] == 0.0 and (np.delete(scores, 5) > 0).all()
    p = surgery.plan(model, data[0][0], method=method, ratio=1 / HID, data=data)
    assert [g.removed for g in p.groups] == [[5]]


@pytest.mark.parametrize("fc2_bias", [True, False], ids=["with-bias", "bias-less"])
def test_flap_bias_compensation_keeps_the_mean_and_pruned_equals_masked(fc2_bias):
    """A consumer without a bias (Llama's down_proj) is given one holding the compensation, in the
    module result, the GraphModule result and mask mode; the user's model keeps none."""
    model, data = TinyLM(fc2_bias), _data()
    x = data[0][0]
    res = run(model, x, "flap", 0.5, data, only_layers=["fc1"])
    (gp,) = res.plan.groups
    assert len(gp.shift) == len(gp.removed) == HID // 2 and not res.plan.notes
    masked = surgery.apply(model, res.plan, mode="mask")
    graph = surgery.apply(model, res.plan, output="graph")
    pruned_fc2 = res.model.fc2
    assert type(res.model) is TinyLM and pruned_fc2.bias.shape == (DIM,) and masked.fc2.bias.shape == (DIM,)
    assert (model.fc2.bias is None) is not fc2_bias  # the user's model is untouched
    tokens = torch.cat([model.embed(t) for t, _ in data]).detach()
    with torch.no_grad():
        full = model.fc2(F.relu(model.fc1(tokens))).mean((0, 1))
        kept = torch.tensor(gp.keep)
        small = pruned_fc2(F.relu(model.fc1(tokens))[..., kept]).mean((0, 1))
        assert torch.allclose(small, full, atol=1e-5)
        assert torch.allclose(res.model(x), masked(x), atol=1e-5)
        assert torch.equal(graph(x), res.model(x)) and torch.equal(graph.fc2.bias, pruned_fc2.bias)
    again = surgery.plan(model, x, method="flap", ratio=0.5, data=data, compensate=False, only_layers=["fc1"])
    assert again.groups[0].shift == () and surgery.Plan.from_json(res.plan.to_json()).groups[0].shift == gp.shift


def test_text_blocks_pydoc_and_file(tmp_path):
    blocks = text_blocks("pydoc", seq_len=16, vocab_size=300, max_blocks=3)
    assert blocks.shape == (3, 16) and blocks.dtype == torch.int64 and int(blocks.max()) < 300
    test = text_blocks("pydoc", seq_len=16, vocab_size=300, split="test", max_blocks=2)
    assert not torch.equal(test, blocks[:2])
    f = tmp_path / "c.txt"
    f.write_text("the cat sat on the mat. " * 200, encoding="utf-8")
    assert text_blocks(str(f), seq_len=8, vocab_size=300).shape[1] == 8
    with pytest.raises(DataError, match=r"^text 'nope.txt' not found"):
        text_blocks("nope.txt", seq_len=8, vocab_size=300)
    with pytest.raises(DataError, match=r"vocabulary \(40\) is smaller than a byte-level tokenizer's"):
        text_blocks("pydoc", seq_len=8, vocab_size=40)


def test_uniform_policy_equal_widths_by_own_scores():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(2))
            with torch.no_grad():
                self.layers[1][0].weight.mul_(10)  # layer 1's neurons dominate a global ranking

        def forward(self, x):
            for layer in self.layers:
                x = x + layer(x)
            return x

    net, x = Two(), torch.randn(2, 8)
    glob = surgery.plan(net, x, method="l1", ratio=0.5, policy="global", normalize="none", only_layers=["layers.*.0"])
    uni = surgery.plan(net, x, method="l1", ratio=0.5, policy="uniform", normalize="none", only_layers=["layers.*.0"])
    assert sorted(len(g.keep) for g in glob.groups) != [8, 8]
    assert [len(g.keep) for g in uni.groups] == [8, 8] and uni.policy == "uniform"
    for g in uni.groups:  # each layer keeps its own 8 largest filters
        w = net.layers[int(g.label.split(".")[1])][0].weight.abs().sum(1)
        assert list(g.keep) == sorted(torch.argsort(w, descending=True)[:8].tolist())
