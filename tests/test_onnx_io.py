"""ONNX in (surgery.frontends.onnx): files built here, outputs equal onnxruntime's, pruned == masked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnx2torch", reason="ONNX import needs the onnx extra: pip install -e '.[onnx]'")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto  # noqa: E402
from onnx import helper as oh  # noqa: E402
from onnx import numpy_helper  # noqa: E402

import surgery  # noqa: E402
from surgery.errors import ModelLoadError  # noqa: E402
from surgery.frontends.onnx import load_onnx  # noqa: E402
from surgery.io import load_model  # noqa: E402

from helpers import check_pruned_equals_masked, n_params  # noqa: E402

_rng = np.random.default_rng(0)


def run_ort(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def assert_matches_ort(path, model, x, tol=1e-5):
    ref = run_ort(path, x)
    with torch.no_grad():
        got = model(x).numpy()
    assert got.shape == ref.shape
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < tol


def export_torch(model, shape, path, dynamic_batch=False):
    """Legacy exporter: fast, and BN folded into conv weights that onnx2torch meets as initializers."""
    axes = {"x": {0: "batch"}} if dynamic_batch else None
    torch.onnx.export(model.eval(), (torch.randn(shape),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes=axes)
    return path


def init(name, *shape, scale=0.3):
    return numpy_helper.from_array((_rng.standard_normal(shape) * scale).astype(np.float32), name)


def const(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.array(values, dtype=dtype), name)


def save_graph(path, nodes, inits, in_shape, opset=17, out="y"):
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                          [oh.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    onnx.save(model, str(path))
    return path


def tf_style(path):
    """What tf2onnx writes for conv -> BN -> relu -> pad -> conv -> flatten -> dense with a dynamic
    batch: NHWC transposes around each conv, BN as Mul/Add with per-channel constants, Flatten as
    Shape/Gather/Unsqueeze/Concat/Reshape, Dense as MatMul + Add."""
    n = oh.make_node
    nodes = [
        n("Transpose", ["x"], ["x_nhwc"], perm=[0, 2, 3, 1]),
        n("Transpose", ["x_nhwc"], ["c1_in"], perm=[0, 3, 1, 2]),
        n("Conv", ["c1_in", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        n("Transpose", ["c1"], ["c1_nhwc"], perm=[0, 2, 3, 1]),
        n("Mul", ["c1_nhwc", "bn_scale"], ["bn_mul"]),
        n("Add", ["bn_mul", "bn_offset"], ["bn"]),
        n("Relu", ["bn"], ["r1"]),
        n("Transpose", ["r1"], ["c2_in"], perm=[0, 3, 1, 2]),
        n("Pad", ["c2_in", "pads"], ["c2_pad"]),  # ZeroPadding2D: pads as a constant input
        n("Conv", ["c2_pad", "w2", "b2"], ["c2"], strides=[2, 2]),
        n("Transpose", ["c2"], ["c2_nhwc"], perm=[0, 2, 3, 1]),
        n("Relu", ["c2_nhwc"], ["r2"]),
        n("Shape", ["r2"], ["shape"]),
        n("Gather", ["shape", "zero"], ["batch"], axis=0),
        n("Unsqueeze", ["batch", "axes0"], ["batch1"]),
        n("Concat", ["batch1", "minus_one"], ["flat_shape"], axis=0),
        n("Reshape", ["r2", "flat_shape"], ["flat"]),
        n("MatMul", ["flat", "dense_w"], ["mm"]),
        n("Add", ["mm", "dense_b"], ["y"]),
    ]
    inits = [init("w1", 6, 3, 3, 3), init("b1", 6), init("bn_scale", 6), init("bn_offset", 6), init("w2", 8, 6, 3, 3),
             init("b2", 8), init("dense_w", 8 * 4 * 4, 5), init("dense_b", 5), const("zero", 0), const("axes0", [0]),
             const("minus_one", [-1]), const("pads", [0, 0, 1, 1, 0, 0, 1, 1])]
    return save_graph(path, nodes, inits, ["N", 3, 8, 8])


def caffe_style(path):
    """What a Caffe conversion looks like: conv -> relu -> pool -> Reshape to a constant (N, -1)
    shape -> Gemm(transB) -> relu -> Flatten -> Gemm."""
    n = oh.make_node
    nodes = [
        n("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        n("Relu", ["c1"], ["r1"]),
        n("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        n("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        n("Relu", ["c2"], ["r2"]),
        n("Reshape", ["r2", "flat_shape"], ["flat"]),
        n("Gemm", ["flat", "fc1_w", "fc1_b"], ["fc1"], transB=1),
        n("Relu", ["fc1"], ["r3"]),
        n("Flatten", ["r3"], ["r3f"], axis=1),
        n("Gemm", ["r3f", "fc2_w", "fc2_b"], ["y"], transB=1),
    ]
    inits = [init("w1", 8, 3, 3, 3), init("b1", 8), init("w2", 6, 8, 3, 3), init("b2", 6),
             init("fc1_w", 12, 6 * 4 * 4, scale=0.1), init("fc1_b", 12), init("fc2_w", 4, 12), init("fc2_b", 4),
             const("flat_shape", [1, -1])]
    return save_graph(path, nodes, inits, [1, 3, 8, 8])


def check_onnx_model(path, shape=None, expect_shape=None):
    model, got_shape = load_onnx(str(path), shape)
    if expect_shape is not None:
        assert got_shape == expect_shape
    x = torch.randn(got_shape)
    assert_matches_ort(path, model, x)
    buffers = [n for n, b in model.named_buffers() if b.is_floating_point() and not n.endswith(("running_mean", "running_var"))]
    assert buffers == [], f"float buffers left: {buffers}"
    foreign = {type(m).__name__ for m in model.modules() if not type(m).__module__.startswith("torch.")}
    assert foreign == set(), f"onnx2torch modules left: {foreign}"
    plan, pruned, masked = check_pruned_equals_masked(model, x, method="l1", ratio=0.5)
    assert plan.groups, "nothing was pruned"
    assert n_params(pruned) < n_params(model)
    return model, plan, pruned


def test_resnet18_from_torch_export(tmp_path):
    import torchvision

    path = export_torch(torchvision.models.resnet18(num_classes=10), (1, 3, 64, 64), tmp_path / "r18.onnx")
    model, plan, _ = check_onnx_model(path, expect_shape=(1, 3, 64, 64))
    # the exporter folded BN into the convs and aliased shared biases with Identity nodes: all gone
    assert not any("Identity" in type(m).__name__ for m in model.modules())
    assert len(plan.groups) >= 8


def test_mobilenet_v2_dynamic_batch(tmp_path):
    import torchvision

    path = export_torch(torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.35), (1, 3, 32, 32),
                        tmp_path / "mbv2.onnx", dynamic_batch=True)
    check_onnx_model(path, expect_shape=(1, 3, 32, 32))
    model, shape = load_onnx(str(path), (3, 3, 32, 32))  # the batch is free: --input-shape picks it
    assert shape == (3, 3, 32, 32)
    assert_matches_ort(path, model, torch.randn(shape))


def test_tf_style_graph(tmp_path):
    """NHWC transposes, BN constants, a Shape/Gather/Concat flatten and a MatMul dense all prune."""
    path = tf_style(tmp_path / "tf.onnx")
    model, plan, pruned = check_onnx_model(path, expect_shape=(1, 3, 8, 8))
    assert not list(model.buffers())  # the int shape/pads constants are literals now
    assert sorted(g.size for g in plan.groups) == [6, 8]  # both convs' channels, through the NHWC flatten
    shapes = sorted(tuple(p.shape) for p in pruned.parameters())
    assert (5, 4 * 4 * 4) in shapes and (3,) in shapes  # the dense weight lost columns; BN scale/offset halved
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 1  # MatMul + Add is a Linear
    ckpt = tmp_path / "pruned.pt"  # only torch.nn modules and torch functions: a dense checkpoint holds it
    x = torch.randn(1, 3, 8, 8)
    surgery.save(pruned, ckpt, example_inputs=x)
    with torch.no_grad():
        assert torch.equal(surgery.load(str(ckpt))(x), pruned(x))


def test_caffe_style_graph(tmp_path):
    path = caffe_style(tmp_path / "caffe.onnx")
    _, plan, pruned = check_onnx_model(path)
    assert sorted(g.size for g in plan.groups) == [6, 8, 12]
    assert sum(p.numel() for p in pruned.parameters()) < 2000


def test_load_dispatch_and_cli(tmp_path):
    from typer.testing import CliRunner

    from surgery.cli import app

    path = caffe_style(tmp_path / "caffe.onnx")
    model, shape, source = load_model(str(path))
    assert shape == (1, 3, 8, 8) and source == f"ONNX model {path}"
    loaded = surgery.load(str(path))
    assert loaded.meta["surgery_input_shape"] == (1, 3, 8, 8)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ModelLoadError, match=r"an ONNX or TensorFlow model takes only input_shape=, got weights$"):
        surgery.load(str(path), weights="w.caffemodel")
    out = tmp_path / "pruned.pt"
    result = CliRunner().invoke(app, ["prune", str(path), "--method", "l1", "--ratio", "0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    reloaded = surgery.load(str(out))
    assert reloaded(x).shape == (1, 4)


def test_symbolic_spatial_dims_need_a_shape(tmp_path):
    n = oh.make_node
    path = save_graph(tmp_path / "free.onnx", [n("Conv", ["x", "w"], ["y"])], [init("w", 4, 3, 1, 1)], ["N", 3, "H", "W"])
    with pytest.raises(ModelLoadError) as exc:
        load_onnx(str(path))
    assert str(exc.value) == (f"{path}: input 'x' has symbolic dims ('?', 3, '?', '?'); "
                              f"pass --input-shape (input_shape=)")
    model, shape = load_onnx(str(path), (2, 3, 5, 7))
    assert_matches_ort(path, model, torch.randn(shape))
    with pytest.raises(ModelLoadError, match=r"input shape \(1, 4, 5, 5\) does not fit the model's input"):
        load_onnx(str(path), (1, 4, 5, 5))


@pytest.mark.parametrize("opset, message", [
    (7, "opset 7 is older than onnx2torch supports (>= 9); upgrade it with onnx.version_converter"),
    (24, "onnx2torch has no converter at opset 24 for Conv; re-export with another opset "
         "(onnx2torch covers opsets 9-21)"),
])
def test_opset_outside_onnx2torch(tmp_path, opset, message):
    n = oh.make_node
    path = save_graph(tmp_path / "m.onnx", [n("Conv", ["x", "w"], ["c"]), n("Relu", ["c"], ["y"])],
                      [init("w", 4, 3, 1, 1)], [1, 3, 4, 4], opset=opset)
    with pytest.raises(ModelLoadError) as exc:
        load_onnx(str(path))
    assert str(exc.value) == f"{path}: {message}"


def test_corrupt_file_is_one_line(tmp_path):
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"\x08\x07garbage that is not protobuf\xff\xff")
    with pytest.raises(ModelLoadError) as exc:
        load_model(str(path))
    text = str(exc.value)
    assert text.startswith(f"{path}: not a readable ONNX model") and "\n" not in text
    assert path.read_bytes().startswith(b"\x08\x07garbage")  # the input is only read


def test_corrupt_graphs_are_one_line(tmp_path):
    """A corrupt op name (with a newline) and an initializer whose data does not fit its shape."""
    n = oh.make_node
    path = save_graph(tmp_path / "name.onnx", [n("Conv", ["x", "w"], ["c"]), n("Re\nlu", ["c"], ["y"])],
                      [init("w", 4, 3, 1, 1)], [1, 3, 4, 4])
    with pytest.raises(ModelLoadError) as exc:
        load_onnx(str(path))
    assert str(exc.value) == (f"{path}: onnx2torch has no converter at opset 17 for Re\\nlu; re-export with another "
                              f"opset (onnx2torch covers opsets 9-21)")
    bad = init("w", 4, 3, 1, 1)
    bad.raw_data = bad.raw_data[:-4]  # one float short
    path = save_graph(tmp_path / "size.onnx", [n("Conv", ["x", "w"], ["y"])], [bad], [1, 3, 4, 4])
    with pytest.raises(ModelLoadError) as exc:
        load_onnx(str(path))
    assert str(exc.value) == f"{path}: not a valid ONNX model (ValueError: cannot reshape array of size 11 into shape (4,3,1,1))"
