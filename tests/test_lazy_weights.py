"""A model built on the meta device is planned with a weight-reading method by reading its weights
lazily from a safetensors checkpoint (``weights=``): the same plan as the loaded model, one tensor
read at a time, and one-line errors where the checkpoint does not fit or no weights exist."""

from __future__ import annotations

import re
import warnings
import weakref

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import surgery
import surgery._lazy_weights as lazy
from surgery.errors import PlanError
from surgery.roles import producers


def _plan(model, x, method, ratio=0.5, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the meta-device and static-export warnings are not under test
        return surgery.plan(model, x, method, ratio, **options)


def _same(real_plan, lazy_plan):
    """Same kept channels in the same groups, same recorded options and notes."""
    assert lazy_plan.groups == real_plan.groups
    assert lazy_plan.options == real_plan.options and "weights" not in lazy_plan.options
    assert lazy_plan.notes == real_plan.notes
    assert lazy_plan.fingerprints == real_plan.fingerprints


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _net_pair(tmp_path, state=None):
    torch.manual_seed(0)
    real = Net().eval()
    with torch.device("meta"):
        meta = Net().eval()
    path = tmp_path / "net.safetensors"
    save_file(real.state_dict() if state is None else state(real.state_dict()), str(path))
    return real, meta, path


# -- the plan is the loaded model's ------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet_pair(tmp_path_factory):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    real = tv.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # distinct gammas, so bn-gate ranks something
        for m in real.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.1, 1.0)
    with torch.device("meta"):
        meta = tv.models.resnet18(num_classes=10).eval()
    d = tmp_path_factory.mktemp("resnet")
    save_file(real.state_dict(), str(d / "plain.safetensors"))
    save_file({"backbone." + k: v for k, v in real.state_dict().items()}, str(d / "prefixed.safetensors"))
    return real, meta, d


@pytest.mark.parametrize("method", ["l1", "group-l2", "bn-gate"])
def test_meta_resnet18_plans_as_the_loaded_one(resnet_pair, method):
    real, meta, d = resnet_pair
    x = torch.randn(1, 3, 64, 64)
    expected = _plan(real, x, method, 0.3)
    assert len(expected.groups) > 5
    _same(expected, _plan(meta, x, method, 0.3, weights=d / "plain.safetensors"))
    assert all(p.is_meta for p in meta.parameters())  # the user's model is not filled in


def test_a_checkpoint_saved_under_a_prefix_is_mapped(resnet_pair):
    """The keys of a wrapper's state_dict (``backbone.conv1.weight``) map to the model's names."""
    real, meta, d = resnet_pair
    x = torch.randn(1, 3, 64, 64)
    _same(_plan(real, x, "l1", 0.3), _plan(meta, x, "l1", 0.3, weights=d / "prefixed.safetensors"))
    src = lazy.LazyWeights(d / "prefixed.safetensors", meta, meta)
    assert src.key("layer1.0.conv1.weight") == "backbone.layer1.0.conv1.weight"


class ReadSpy:
    """Wraps ``LazyWeights._read`` (the one place tensor bytes are read): the keys read, and the
    most tensors / bytes read from the files that were alive at once (freed ones are counted out
    by a finalizer, so a tensor held by the cache or by a method counts until it is dropped)."""

    def __init__(self, monkeypatch):
        self.keys, self.alive, self.peak, self.peak_bytes = [], {}, 0, 0
        read = lazy.LazyWeights._read

        def spy(source, key):
            t = read(source, key)
            self.keys.append(key)
            token = object()
            self.alive[id(token)] = t.numel() * t.element_size()
            weakref.finalize(t, self.alive.pop, id(token), None)
            self.peak = max(self.peak, len(self.alive))
            self.peak_bytes = max(self.peak_bytes, sum(self.alive.values()))
            return t

        monkeypatch.setattr(lazy.LazyWeights, "_read", spy)


def _seq():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).eval()


@pytest.fixture
def seq(tmp_path):
    torch.manual_seed(0)
    real = _seq()
    with torch.device("meta"):
        meta = _seq()
    path = tmp_path / "seq.safetensors"
    save_file(real.state_dict(), str(path))
    return real, meta, path


def test_tensors_are_read_one_at_a_time_and_only_those_scored(seq, monkeypatch):
    """With no cache, at most one tensor read from the file is alive at any moment, and only the
    producing filters l1 scores are read (never the whole checkpoint)."""
    real, meta, path = seq
    spy = ReadSpy(monkeypatch)
    monkeypatch.setattr(lazy, "CACHE_BYTES", 0)
    x = torch.randn(2, 8)
    _same(_plan(real, x, "l1"), _plan(meta, x, "l1", weights=path))
    assert spy.peak == 1 and not spy.alive
    graph = surgery.trace(real, x)
    scored = {f"{m.module}.{m.param}" for g in graph.groups if g.prunable for _, m in producers(graph, g)}
    assert sorted(spy.keys) == sorted(scored) == ["0.weight", "2.weight"]  # no bias, no last layer


@pytest.mark.parametrize("budget, reads_of_2_weight", [(0, 2), (16 * 12 * 4, 1), (lazy.CACHE_BYTES, 1)])
def test_the_cache_keeps_tensors_within_its_budget(seq, monkeypatch, budget, reads_of_2_weight):
    """group-l1 reads ``2.weight`` (768 bytes) for its input group (16) and its output group (12):
    a budget of one such weight keeps it between the two, no budget reads it twice; the bytes alive
    never pass budget + the largest tensor, and every other tensor of both groups is read once."""
    real, meta, path = seq
    spy = ReadSpy(monkeypatch)
    monkeypatch.setattr(lazy, "CACHE_BYTES", budget)
    x = torch.randn(2, 8)
    _same(_plan(real, x, "group-l1"), _plan(meta, x, "group-l1", weights=path))
    largest = max(t.numel() * t.element_size() for t in real.state_dict().values())
    assert 0 < spy.peak_bytes <= budget + largest and not spy.alive
    assert sorted(spy.keys) == sorted(["0.weight", "0.bias", "2.bias", "4.weight"] + ["2.weight"] * reads_of_2_weight)


# -- Hugging Face: shards, a different head, tied embeddings -------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("transformers")
    import transformers
    from hf_models import example_inputs, tiny_llama

    out = {}
    for tied in (False, True):
        real = tiny_llama(tie_word_embeddings=tied)
        d = tmp_path_factory.mktemp(f"llama_tied_{tied}")
        real.save_pretrained(d, max_shard_size="40KB")  # several shards
        with torch.device("meta"):
            meta = transformers.LlamaForCausalLM(real.config).eval()
        out[tied] = real, meta, d
    return out, example_inputs("llama")


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("method", ["l1", "group-l1", "l2"])
def test_meta_llama_plans_as_the_loaded_one(llama, tied, method):
    models, x = llama
    real, meta, d = models[tied]
    assert len(list(d.glob("*.safetensors"))) > 1
    _same(_plan(real, x, method), _plan(meta, x, method, weights=d))


def test_tied_lm_head_is_read_from_the_embedding(llama):
    models, _ = llama
    real, meta, d = models[True]
    src = lazy.LazyWeights(d, meta, meta)
    assert src.key("lm_head.weight") == "model.embed_tokens.weight"
    assert torch.equal(src.get("lm_head.weight", meta.lm_head.weight), real.model.embed_tokens.weight)


def test_an_untied_head_missing_from_the_checkpoint_is_not_read_from_the_embedding(llama, tmp_path):
    """Llama's class lists lm_head as tieable to the embedding; untied, a checkpoint without it is an error."""
    models, x = llama
    real, meta, _ = models[False]
    path = tmp_path / "no_head.safetensors"
    save_file({k: v for k, v in real.state_dict().items() if k != "lm_head.weight"}, str(path))
    _raises(f"weights={str(path)!r}: no tensor for parameter 'lm_head.weight' in the checkpoint "
            f"(looked for 'lm_head.weight')", meta, x, "group-l1", weights=path)


def test_a_base_model_reads_a_task_model_checkpoint(llama):
    """``LlamaModel`` on meta with the checkpoint of a ``LlamaForCausalLM`` (keys ``model.layers...``)."""
    import transformers

    models, x = llama
    real_lm, _, d = models[False]
    real = transformers.LlamaModel(real_lm.config).eval()
    real.load_state_dict(real_lm.model.state_dict())
    with torch.device("meta"):
        meta = transformers.LlamaModel(real_lm.config).eval()
    _same(_plan(real, x, "l1"), _plan(meta, x, "l1", weights=d))


# -- errors ------------------------------------------------------------------------------------


def _raises(message, model, x, method="l1", **options):
    with pytest.raises(PlanError, match=f"^{re.escape(message)}$"):
        _plan(model, x, method, **options)


def test_missing_path_empty_directory_and_a_file_that_is_not_safetensors(tmp_path):
    _, meta, _ = _net_pair(tmp_path)
    x = torch.randn(2, 8)
    gone = tmp_path / "nope"
    _raises(f"weights={str(gone)!r}: no such file or directory", meta, x, weights=gone)
    empty = tmp_path / "empty"
    empty.mkdir()
    _raises(f"weights={str(empty)!r}: no .safetensors file in this directory", meta, x, weights=str(empty))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(PlanError, match=f"^{re.escape(f'weights={str(bad)!r}: bad.safetensors is not a readable safetensors file (')}"):
        _plan(meta, x, "l1", weights=bad)
    _raises("weights must be the path of a .safetensors file or of a directory of them, got 3", meta, x, weights=3)


def test_a_checkpoint_without_a_scored_tensor(tmp_path):
    _, meta, path = _net_pair(tmp_path, state=lambda sd: {k: v for k, v in sd.items() if k != "a.weight"})
    _raises(f"weights={str(path)!r}: no tensor for parameter 'a.weight' in the checkpoint (looked for 'a.weight')",
            meta, torch.randn(2, 8), weights=path)


def test_a_checkpoint_tensor_of_another_shape(tmp_path):
    _, meta, path = _net_pair(tmp_path, state=lambda sd: {**sd, "a.weight": torch.zeros(16, 9)})
    _raises(f"weights={str(path)!r}: tensor 'a.weight' has shape (16, 9) in the checkpoint, but parameter "
            f"'a.weight' has shape (16, 8) in the model", meta, torch.randn(2, 8), weights=path)


def test_data_methods_and_missing_weights_on_meta_and_weights_on_a_real_model(tmp_path):
    real, meta, path = _net_pair(tmp_path)
    x = torch.randn(2, 8)
    data = [(torch.randn(2, 8), torch.tensor([0, 1]))]
    msg = ("method 'taylor' runs the model on calibration data, which a model on the meta device cannot do: load the "
           "weights first (e.g. from_pretrained, load_state_dict(..., assign=True)), or plan with weights=CHECKPOINT "
           "and a method that only reads weights (l1, l2, group-l1, ...)")
    with pytest.raises(PlanError, match=f"^{re.escape(msg)}$"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            surgery.plan(meta, x, "taylor", 0.5, data, weights=path)
    _raises("method 'l2' reads the model's weights, but they are on the meta device (no data): pass "
            "weights=CHECKPOINT (a .safetensors file or directory) to read them lazily, load the weights first "
            "(e.g. from_pretrained, load_state_dict(..., assign=True)), or plan with a method that reads none (random)",
            meta, x, "l2")
    _raises("weights= is only for a model on the meta device (this model's parameters hold their values)",
            real, x, weights=path)
