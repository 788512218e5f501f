"""Dense checkpoints of the user's own class: torchvision, timm and custom models reload as their
class (bit-identical, trainable); untrusted, unimportable, unstorable or changed classes reload as
the GraphModule with the reason; forged class names never import outside the allowed packages."""

from __future__ import annotations

import copy
import importlib
import io
import json
import types
import warnings

import pytest
import timm
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import surgery
from surgery import _allowlist, checkpoint
from surgery.errors import ModelLoadError

X = torch.randn(1, 3, 32, 32)


class Block(nn.Module):
    """A user's class: its own attributes (a tuple, a function, a class) and a method."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv, self.bn = nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c)
        self.head = nn.Linear(2 * c, 5)
        self.act, self.norm_layer, self.dims, self.tag = torch.relu, nn.BatchNorm2d, (2, 3), "custom"

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(self.act(self.stem(x))))).mean(self.dims))

    def describe(self) -> str:
        return f"{self.tag} block"


class ShapeChecked(nn.Module):
    """fx cannot trace the assert: the export front end traces it."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        assert x.shape[1] == 3, "expects images"
        return self.fc(torch.relu(self.bn1(self.c1(x))).mean((2, 3)))


def _randomise_bn(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def _pruned(make) -> nn.Module:
    torch.manual_seed(0)
    model = _randomise_bn(make())
    pruned = surgery.prune(model, X, "l1", 0.5)
    assert type(pruned) is type(model)
    return pruned


MODELS = {"resnet18": torchvision.models.resnet18, "mobilenet_v3_small": torchvision.models.mobilenet_v3_small,
          "timm_resnet10t": lambda: timm.create_model("resnet10t", pretrained=False)}


@pytest.fixture(scope="module")
def pruned_models():
    """Each model pruned once for the whole file (pruning is the slow part)."""
    cache: dict[str, nn.Module] = {}
    return lambda name: cache[name] if name in cache else cache.setdefault(name, _pruned(MODELS[name]))


def _load(path, **kw):
    """``surgery.load`` that fails on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return surgery.load(path, **kw)


def _same_outputs(a: nn.Module, b: nn.Module) -> None:
    with torch.no_grad():
        for x in (X, torch.randn(2, 3, 32, 32)):
            ya, yb = a(x), b(x)
            assert ya.shape == yb.shape and torch.equal(ya, yb)


def _trains(model: nn.Module) -> None:
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    stats, weights = bn.running_mean.clone(), [p.detach().clone() for p in model.parameters()]
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        loss = model(torch.randn(2, 3, 32, 32)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and not torch.equal(bn.running_mean, stats)
    assert sum(not torch.equal(w, p) for w, p in zip(weights, model.parameters())) > len(weights) // 2


@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_model_reloads_as_its_own_class(name, pruned_models, tmp_path):
    pruned = pruned_models(name)
    surgery.save(pruned, tmp_path / "p.pt", metadata={"method": "l1"}, example_inputs=X)
    back = _load(tmp_path / "p.pt")
    assert type(back) is type(pruned) and not back.training
    assert checkpoint.metadata_of(back) == {"method": "l1"}
    assert [(n, type(m)) for n, m in back.named_modules()] == [(n, type(m)) for n, m in pruned.named_modules()]
    for (n, m), o in zip(back.named_modules(), pruned.modules()):
        plain = {k: v for k, v in vars(o).items() if not k.startswith("_") and not isinstance(v, torch.Tensor)}
        assert {k: getattr(m, k) for k in plain} == plain, n
    sa, sb = pruned.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    _same_outputs(back, pruned)
    _trains(back)
    _same_outputs(pruned, pruned_models(name))  # the saved model itself is untouched by training the loaded one
    graph = _load(tmp_path / "p.pt", output="graph")
    assert isinstance(graph, torch.fx.GraphModule) and graph.meta["surgery"] == {"method": "l1"}


def test_custom_class_needs_trust(tmp_path):
    pruned = _pruned(Block)
    surgery.save(pruned, tmp_path / "b.pt", example_inputs=X)
    with pytest.warns(UserWarning, match=r"loading a GraphModule instead of test_checkpoint_modules:Block: "
                                         r"test_checkpoint_modules:Block is outside the packages .* trust=True") as caught:
        graph = surgery.load(tmp_path / "b.pt")
    assert len(caught) == 1 and isinstance(graph, torch.fx.GraphModule)
    assert graph.meta["surgery_output"]["reason"].endswith("load with trust=True (CLI --trust) if you trust this file")
    _same_outputs(graph, pruned)
    with pytest.raises(ModelLoadError, match=r"b\.pt: cannot rebuild test_checkpoint_modules:Block: .*outside the packages"):
        surgery.load(tmp_path / "b.pt", output="module")
    back = _load(tmp_path / "b.pt", trust=True)
    assert type(back) is Block and back.describe() == "custom block"
    assert back.act is torch.relu and back.norm_layer is nn.BatchNorm2d and back.dims == (2, 3)
    assert back.conv.out_channels == pruned.conv.out_channels < 16
    _same_outputs(back, pruned)
    _trains(back)


def test_changed_class_or_unstorable_attribute_falls_back(tmp_path, monkeypatch):
    pruned = _pruned(Block)
    surgery.save(pruned, tmp_path / "b.pt", example_inputs=X)
    monkeypatch.setattr(Block, "forward", lambda self, x: self.head(self.bn(self.conv(self.stem(x))).mean((2, 3))))
    with pytest.warns(UserWarning, match="its outputs differ from the stored graph's on the stored example input"):
        assert isinstance(surgery.load(tmp_path / "b.pt", trust=True), torch.fx.GraphModule)
    monkeypatch.undo()
    pruned.helper = lambda x: x  # not storable: the file still saves, and reloads as the graph
    surgery.save(pruned, tmp_path / "h.pt", example_inputs=X)
    with pytest.warns(UserWarning, match=r"not stored: attribute helper \(a function without an importable qualified name"):
        _same_outputs(surgery.load(tmp_path / "h.pt", trust=True), pruned)
    copied = copy.deepcopy(pruned)  # not a result of surgery.apply: no example inputs are known for it
    with pytest.warns(UserWarning, match="saving Block as a graph only: its own class is checked on load on the example inputs' shapes"):
        surgery.save(copied, tmp_path / "n.pt")
    assert isinstance(_load(tmp_path / "n.pt", trust=True), torch.fx.GraphModule)
    with pytest.raises(ModelLoadError, match="holds a GraphModule, not a model's own class"):
        surgery.load(tmp_path / "n.pt", output="module")


def _forge(src, dst, edit) -> None:
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    spec = json.loads(meta["model"])
    edit(spec["tree"])
    meta["model"] = json.dumps(spec)
    tensors = load_file(str(src))
    if hasattr(checkpoint, "checksum"):  # a forger recomputes it
        meta["checksum"] = checkpoint.checksum(meta, tensors)
    save_file(tensors, str(dst), metadata=meta)


def _root(name):
    return lambda tree: tree["modules"][0].update({"class": name})


def _attr(value):
    return lambda tree: tree["modules"][0]["attrs"].update(act=value)


@pytest.mark.parametrize("edit, trust, expect", [
    (_root("os.system"), False, "os.system is outside the packages"),
    (_root("os:system"), True, "os:system is not a module class that a checkpoint may name"),
    (_root("builtins.eval"), False, "builtins.eval is outside the packages"),
    (_root("builtins:eval"), True, "builtins:eval is not a module class"),
    (_root("__main__.X"), True, r"__main__.X is defined in a script \(__main__\), which is never imported"),
    (_root("no_such_pkg.models:Net"), False, "no_such_pkg.models:Net is outside the packages"),
    (_root("no_such_pkg.models:Net"), True, r"cannot import no_such_pkg.models \(ModuleNotFoundError"),
    (_root("torch.nn:Nope"), False, "torch.nn has no Nope"),
    (_root("torch.fx:GraphModule"), False, "torch.fx:GraphModule is not a module class"),
    (_root("torch.nn; import os:Conv2d"), True, ModelLoadError("not a qualified class or function name")),
    (_root("torch.__builtins__:eval"), True, ModelLoadError("not a qualified class or function name")),
    (_attr({"$function": "torch:load"}), False, "torch:load is not a function that a checkpoint may name"),
    (_attr({"$function": "subprocess:run"}), False, "subprocess:run is outside the packages"),
    (_attr({"$function": "timm.models._helpers:load_checkpoint"}), False, "load_checkpoint is not a function that"),
    (_attr({"$partial": [{"$function": "torch.hub:load"}, [], {"$dict": {}}]}), False, "torch.hub:load is not a function"),
    (lambda tree: tree["modules"][0]["attrs"].update(__class__="x"), True, ModelLoadError("forbidden attribute '__class__'")),
    (_attr({"$config": ["transformers.models.bert.configuration_bert:BertConfig", {"$dict": {"__class__": 1}}]}), False,
     ModelLoadError("configuration .* is malformed")),
    (_attr({"$config": ["torch.nn:Linear", {"$dict": {}}]}), False, "torch.nn:Linear is not a config that a checkpoint may name"),
    (_attr({"$enum": ["torch.fx.passes.runtime_assert:X", "A"]}), False, "torch.fx.passes.runtime_assert has no X"),
])
def test_forged_class_names_never_import_outside_the_allowed_packages(tmp_path, monkeypatch, edit, trust, expect):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    net.act = torch.relu
    surgery.save(net, tmp_path / "ok.pt", example_inputs=X)
    assert type(_load(tmp_path / "ok.pt")) is nn.Sequential
    _forge(tmp_path / "ok.pt", tmp_path / "bad.pt", edit)
    imported = []  # what the checkpoint loader imports (an allowed package may import others itself)
    record = types.SimpleNamespace(import_module=lambda name: imported.append(name) or importlib.import_module(name))
    monkeypatch.setattr(_allowlist, "importlib", record)
    if isinstance(expect, ModelLoadError):
        with pytest.raises(ModelLoadError, match=str(expect)) as exc:
            surgery.load(tmp_path / "bad.pt", trust=trust)
        assert "\n" not in str(exc.value)
    else:
        with pytest.warns(UserWarning, match=expect) as caught:
            back = surgery.load(tmp_path / "bad.pt", trust=trust)
        assert len(caught) == 1 and isinstance(back, torch.fx.GraphModule)
    if not trust:
        assert all(name.split(".")[0] in ("torch", "torchvision", "timm", "transformers", "surgery") for name in imported), imported
    assert "no_such_pkg" not in str(imported) or trust


def test_torch_save_of_a_pruned_model_round_trips(pruned_models, tmp_path):
    model = torchvision.models.resnet18().eval()
    pruned = pruned_models("resnet18")
    # nothing surgery used (fx tracing, meta, hooks) is left on the user's modules
    assert [sorted(vars(m)) for m in pruned.modules()] == [sorted(vars(m)) for m in model.modules()]
    surgery.save(pruned, tmp_path / "p.pt", example_inputs=X)
    loaded = _load(tmp_path / "p.pt")
    assert [sorted(vars(m)) for m in loaded.modules()] == [sorted(vars(m)) for m in model.modules()]
    for m in (pruned, loaded):  # the pruned model, and the one a checkpoint rebuilt
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
        assert type(back) is type(pruned)
        _same_outputs(back, pruned)


def test_export_front_end_results_save_and_reload(tmp_path):
    """A torch.export graph keeps ``surgery_static_batch`` (nested inputs: test_export_dynamic); its
    pruned GraphModule and the pruned model's own class reload too."""
    from surgery.dependency_graph.exporting import export_module

    torch.manual_seed(0)
    model = _randomise_bn(ShapeChecked())
    exported = export_module(model, (X,))
    surgery.save(exported, tmp_path / "e.pt")
    back = _load(tmp_path / "e.pt")
    assert back.meta["surgery_static_batch"] is exported.meta["surgery_static_batch"] is False
    _same_outputs(back, model)
    graph = surgery.prune(model, X, "l1", 0.5, output="graph")
    surgery.save(graph, tmp_path / "g.pt")
    again = _load(tmp_path / "g.pt")
    assert again.meta["surgery_frontend"] == "export"
    _same_outputs(again, graph)
    own = surgery.prune(model, X, "l1", 0.5)
    assert type(own) is ShapeChecked
    surgery.save(own, tmp_path / "o.pt", example_inputs=X)
    mine = _load(tmp_path / "o.pt", trust=True)
    assert type(mine) is ShapeChecked and mine.c1.out_channels == own.c1.out_channels == 4
    _same_outputs(mine, own)


def test_cli_reads_and_prunes_an_own_class_checkpoint(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from surgery.cli import app

    pruned = _pruned(Block)
    meta = {"method": "l1", "ratio": 0.5, "source": "Block", "input_shape": [1, 3, 32, 32]}
    surgery.save(pruned, tmp_path / "b.pt", metadata=meta, example_inputs=X)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    params = sum(p.numel() for p in pruned.parameters())
    for trust in ([], ["--trust"]):  # the graph without --trust, the class with it: same numbers
        r = CliRunner().invoke(app, ["stats", "b.pt", *trust])
        assert r.exit_code == 0, r.output
        assert f" {params} " in r.output.split("params", 1)[1].split("\n")[0], r.output
        assert "l1 ratio 0.5 from Block" in r.output
    r = CliRunner().invoke(app, ["prune", "b.pt", "--trust", "--ratio", "0.25", "--out", "b2.pt"])
    assert r.exit_code == 0 and "result: Block" in r.output, r.output
    again = _load(tmp_path / "b2.pt", trust=True)
    assert type(again) is Block and checkpoint.metadata_of(again)["source"] == "surgery checkpoint b.pt"
    assert sum(p.numel() for p in again.parameters()) < params


def test_transformers_model_reloads_with_its_config(tmp_path):
    """A transformers model keeps its config (rebuilt without its constructor; id2label has int keys)
    and its sets of module names."""
    from hf_models import tiny_bert

    model = tiny_bert()
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    surgery.save(model, tmp_path / "bert.pt", example_inputs=ids)
    back = _load(tmp_path / "bert.pt")
    assert type(back) is type(model) and type(back.config) is type(model.config)
    assert back.config.to_dict() == model.config.to_dict() and back.config.id2label == model.config.id2label
    assert back.config._attn_implementation == model.config._attn_implementation
    with torch.no_grad():
        for x in (ids, torch.randint(0, model.config.vocab_size, (2, 5))):
            assert torch.equal(back(x).logits, model(x).logits)


def test_an_apply_result_saves_its_own_class_without_example_inputs(pruned_models, tmp_path):
    # surgery.apply remembers the inputs it traced and checked the result with (DESIGN.md's save example)
    pruned = pruned_models("resnet18")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        surgery.save(pruned, tmp_path / "p.pt")
        back = surgery.load(tmp_path / "p.pt")
    assert type(back) is type(pruned)
    _same_outputs(back, pruned)
