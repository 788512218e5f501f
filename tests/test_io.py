"""Loading models from specs and files (surgery.io): what loads, and what is refused in one line."""

from __future__ import annotations

import os
import pickle
import sys
import textwrap

import pytest
import torch

from surgery.errors import ModelLoadError, SurgeryError
from surgery.io import load_model, parse_input_shape


def small_net() -> torch.nn.Module:
    """Conv + a torchvision.ops block + a head: every class is on the pickle allow-list."""
    from torchvision.ops.misc import Conv2dNormActivation

    return torch.nn.Sequential(Conv2dNormActivation(3, 8), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2))


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text, text
    return text


@pytest.mark.parametrize("text, shape", [("1,3,224,224", (1, 3, 224, 224)), ("2x3x8x8", (2, 3, 8, 8)), (" (1, 10) ", (1, 10))])
def test_parse_input_shape(text, shape):
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["", "1,a", "1,0,3", "-1,3"])
def test_parse_input_shape_rejects(text):
    with pytest.raises(SurgeryError, match="input shape"):
        parse_input_shape(text)


@pytest.mark.parametrize("name, shape", [("resnet18", (1, 3, 224, 224)), ("inception_v3", (1, 3, 299, 299)),
                                         ("r3d_18", (1, 3, 16, 112, 112))])
def test_torchvision_spec_and_input_shape(name, shape):
    model, got, source = load_model(f"torchvision:{name}")
    assert got == shape and source == f"torchvision:{name}"
    assert isinstance(model, torch.nn.Module)


def test_torchvision_kwargs_and_unknown_name():
    model, _, _ = load_model("torchvision:resnet18", kwargs={"num_classes": 7})
    assert model.fc.out_features == 7
    with pytest.raises(ModelLoadError, match="unknown torchvision model 'resnet1'.*resnet18") as exc:
        load_model("torchvision:resnet1")
    one_line(exc)


def test_timm_missing_is_clear():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ModelLoadError, match="needs the timm package") as exc:
            load_model("timm:resnet18")
        one_line(exc)
    else:
        model, shape, _ = load_model("timm:resnet18")
        assert shape == (1, 3, 224, 224)


def test_factory_spec(tmp_path, monkeypatch):
    (tmp_path / "io_factory_mod.py").write_text(textwrap.dedent("""
        import torch
        def make(width=4):
            return torch.nn.Linear(3, width)
        def not_a_module():
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model, shape, source = load_model("io_factory_mod:make", kwargs={"width": 5})
    assert model.out_features == 5 and shape is None and source == "io_factory_mod:make"
    with pytest.raises(ModelLoadError, match="not an nn.Module"):
        load_model("io_factory_mod:not_a_module")
    with pytest.raises(ModelLoadError, match="no callable 'missing'"):
        load_model("io_factory_mod:missing")


@pytest.mark.parametrize("spec, pattern", [
    ("nosuchprefix:thing", "unknown model spec nosuchprefix:thing"),
    ("just-a-word", "not an existing file, and not a model spec"),
    ("nowhere/model.pt", "no such file"),
    ("missing.pth", "no such file"),
])
def test_bad_specs(spec, pattern):
    with pytest.raises(ModelLoadError, match=pattern) as exc:
        load_model(spec)
    one_line(exc)


def test_whole_module_pickle_loads_without_trust(tmp_path):
    net = small_net().eval()
    torch.save(net, tmp_path / "net.pt")
    before = (tmp_path / "net.pt").read_bytes()
    model, shape, source = load_model(tmp_path / "net.pt")
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(model.eval()(x), net(x)) and shape is None and "pickle" in source
    assert (tmp_path / "net.pt").read_bytes() == before


def test_foreign_class_refused_then_trusted(tmp_path, monkeypatch):
    (tmp_path / "io_foreign_mod.py").write_text("import torch\nclass Foreign(torch.nn.Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import io_foreign_mod

    torch.save(io_foreign_mod.Foreign(2, 2), tmp_path / "f.pt")
    with pytest.raises(ModelLoadError, match=r"io_foreign_mod\.Foreign.*--trust") as exc:
        load_model(tmp_path / "f.pt")
    one_line(exc)
    model, _, _ = load_model(tmp_path / "f.pt", trust=True)
    assert type(model).__name__ == "Foreign"


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_malicious_pickle_never_executes(tmp_path, how):
    sentinel = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save(_Evil(str(sentinel)), path)
    else:
        path.write_bytes(pickle.dumps(_Evil(str(sentinel))))
    with pytest.raises(ModelLoadError, match="refusing.*--trust") as exc:
        load_model(path)
    one_line(exc)
    assert not sentinel.exists()


def test_graph_module_pickle_needs_trust(tmp_path):
    """fx GraphModule pickles carry Python source that is exec'd on load: never without trust."""
    torch.save(torch.fx.symbolic_trace(small_net()), tmp_path / "gm.pt")
    with pytest.raises(ModelLoadError, match=r"refusing to unpickle torch\.fx\..*--trust"):
        load_model(tmp_path / "gm.pt")


def test_bad_files(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("not a model at all\n")
    torch.save(small_net(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "folder.pt").mkdir()
    for name, pattern in [("empty.pt", "is empty"), ("text.pt", "not a model file"), ("trunc.pt", "truncated or corrupt"),
                          ("folder.pt", "is a directory")]:
        with pytest.raises(ModelLoadError, match=pattern) as exc:
            load_model(tmp_path / name)
        one_line(exc)


def test_state_dict_file_and_weights(tmp_path):
    src = small_net()
    torch.save(src.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ModelLoadError, match="state_dict, not a model.*--weights"):
        load_model(tmp_path / "sd.pt")
    (tmp_path / "io_sd_mod.py").write_text(
        "import torch\nfrom torchvision.ops.misc import Conv2dNormActivation\n"
        "def small_net():\n    return torch.nn.Sequential(Conv2dNormActivation(3, 8), torch.nn.AdaptiveAvgPool2d(1), "
        "torch.nn.Flatten(), torch.nn.Linear(8, 2))\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        model, _, source = load_model("io_sd_mod:small_net", weights=tmp_path / "sd.pt")
    finally:
        sys.path.remove(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values()))
    assert "weights" in source
    torch.save({"fc.weight": torch.zeros(1), "extra": torch.zeros(1)}, tmp_path / "bad_sd.pt")
    with pytest.raises(ModelLoadError, match="do not fit.*missing.*unexpected.*wrong shape .fc.weight") as exc:
        load_model("torchvision:resnet18", weights=tmp_path / "bad_sd.pt")
    one_line(exc)


def test_export_program(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    torch.export.save(torch.export.export(net, (x,)), tmp_path / "net.pt2")
    model, shape, source = load_model(tmp_path / "net.pt2")
    assert shape == (1, 3, 8, 8) and "export" in source
    assert torch.allclose(model(x), net(x))


def test_checkpoint_is_detected_whatever_the_extension(tmp_path):
    from surgery import checkpoint

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    checkpoint.save(net, tmp_path / "net.bin", metadata={"input_shape": [1, 3, 8, 8]})
    model, shape, source = load_model(tmp_path / "net.bin")
    assert shape == (1, 3, 8, 8) and source.startswith("surgery checkpoint")

