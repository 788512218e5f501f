"""Export out (surgery.export, `surgery export`): ONNX runs in onnxruntime like PyTorch, .pt2 reloads
bit-identically, a dynamic batch takes any size, writes are atomic."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need the onnx extra: pip install -e '.[onnx]'")
pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript: pip install -e '.[onnx]'")

import surgery  # noqa: E402
from surgery.errors import SurgeryError  # noqa: E402
from surgery.layers import StripeConv  # noqa: E402

from helpers import assert_same_state, state_snapshot  # noqa: E402


class Block(nn.Module):
    """conv-BN-relu, a residual pair and a linear head: a user's own class."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b(torch.relu(self.a(x))))
        return self.head(x.mean((2, 3)))


def run_ort(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def assert_onnx_matches(path, model, x, tol=1e-4):
    with torch.no_grad():
        ref = model(x).numpy()
    got = run_ort(path, x)
    assert got.shape == ref.shape
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < tol


def pruned_block():
    model = Block().eval()
    x = torch.randn(1, 3, 12, 12)
    return surgery.prune(model, x, method="l1", ratio=0.5), x


def test_module_tree_to_onnx_dynamic_batch(tmp_path):
    pruned, x = pruned_block()
    assert type(pruned) is Block
    before = state_snapshot(pruned)
    path = surgery.export(pruned, tmp_path / "m.onnx", example_inputs=x, dynamic_batch=True)
    assert path == str(tmp_path / "m.onnx")
    assert_onnx_matches(path, pruned, torch.randn(3, 3, 12, 12))  # batch 3 through a file traced at 1
    assert_onnx_matches(path, pruned, x)
    assert_same_state(pruned, before)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no temporary file left


def test_graph_module_to_onnx_opset_and_pt2(tmp_path):
    model = Block().eval()
    x = torch.randn(1, 3, 12, 12)
    gm = surgery.apply(model, surgery.plan(model, x, method="l1", ratio=0.5), output="graph")
    assert isinstance(gm, torch.fx.GraphModule)
    import onnx

    path = surgery.export(gm, tmp_path / "g.onnx", example_inputs=x, opset=17)
    assert onnx.load(path).opset_import[0].version == 17
    assert_onnx_matches(path, gm, x)
    with pytest.raises(Exception):  # a static file keeps its batch of 1
        run_ort(path, torch.randn(3, 3, 12, 12))
    pt2 = surgery.export(gm, tmp_path / "g.pt2", format="pt2", example_inputs=x, dynamic_batch=True)
    reloaded = torch.export.load(pt2).module()
    for batch in (1, 3):
        xb = torch.randn(batch, 3, 12, 12)
        with torch.no_grad():
            assert torch.equal(reloaded(xb), gm(xb))


def test_stripe_conv_exports(tmp_path):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2, bias=True)
    alive = torch.rand(6, 3, 3) > 0.5
    model = nn.Sequential(StripeConv.from_conv(conv, alive), nn.ReLU(), nn.Conv2d(6, 2, 1)).eval()
    x = torch.randn(2, 4, 9, 9)
    path = surgery.export(model, tmp_path / "stripe.onnx", example_inputs=x)
    assert_onnx_matches(path, model, x)


class FixedBatch(nn.Module):
    def forward(self, x):
        return x.reshape(1, 3, 4, 4) * 2


def test_errors_are_one_line_and_leave_no_file(tmp_path):
    x = torch.randn(1, 3, 4, 4)
    out = tmp_path / "f.onnx"
    with pytest.raises(SurgeryError) as exc:
        surgery.export(FixedBatch(), out, example_inputs=x, dynamic_batch=True)
    assert str(exc.value).startswith("cannot export with a dynamic batch (the model fixes its batch size: ")
    assert str(exc.value).endswith("; export without dynamic_batch") and "\n" not in str(exc.value)
    with pytest.raises(SurgeryError, match=r"^unknown export format 'tflite'; known formats: onnx, pt2$"):
        surgery.export(FixedBatch(), out, format="tflite", example_inputs=x)
    with pytest.raises(SurgeryError, match=r"^export needs example_inputs \(a tensor or a tuple of tensors\)$"):
        surgery.export(FixedBatch(), out)
    assert os.listdir(tmp_path) == []


def test_cli_export_from_checkpoint(tmp_path):
    from typer.testing import CliRunner

    from surgery.cli import app

    pruned, x = pruned_block()
    ckpt = tmp_path / "p.pt"
    surgery.save(pruned, ckpt, metadata={"input_shape": list(x.shape)}, example_inputs=x)
    before = ckpt.read_bytes()
    runner = CliRunner()
    out = tmp_path / "p.onnx"
    result = runner.invoke(app, ["export", str(ckpt), "--format", "onnx", "--out", str(out), "--dynamic-batch"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (onnx, input (3, 12, 12) at any batch)" in result.output.replace("\n", "")
    assert_onnx_matches(out, pruned, torch.randn(3, 3, 12, 12))
    pt2 = tmp_path / "p.pt2"
    result = runner.invoke(app, ["export", str(ckpt), "--format", "pt2", "--out", str(pt2), "--input-shape", "2,3,12,12"])
    assert result.exit_code == 0, result.output
    xb = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(torch.export.load(str(pt2)).module()(xb), surgery.load(str(ckpt))(xb))
    for args, message in (
        (["--format", "tflite", "--out", str(tmp_path / "x.tfl")], "unknown export format 'tflite'; known formats: onnx, pt2"),
        (["--format", "pt2", "--opset", "17", "--out", str(tmp_path / "x.pt2")], "--opset applies to --format onnx only"),
        (["--out", str(ckpt)], f"refusing to overwrite the input model {ckpt} with the export"),
    ):
        result = runner.invoke(app, ["export", str(ckpt), *args])
        assert result.exit_code == 1
        assert result.output.strip() == f"error: {message}" or result.stderr.strip() == f"error: {message}"
    assert ckpt.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["p.onnx", "p.pt", "p.pt2"]
