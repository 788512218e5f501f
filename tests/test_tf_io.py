"""TensorFlow/Keras in (surgery.frontends.tensorflow): models are built by TensorFlow in a child
process, converted in another (tf2onnx), and TensorFlow never enters this one.

The default suite runs one small Keras functional model and bad files; the other formats and
the acceptance models (Keras ResNet50 and MobileNetV2 -> prune -> ONNX) are marked slow: each
TensorFlow start costs several seconds, ResNet50's conversion about a minute on 2 cores.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

_HAVE_TF = all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "tf2onnx", "onnx2torch", "onnxruntime"))
needs_tf = pytest.mark.skipif(not _HAVE_TF, reason="TensorFlow tests need pip install -e '.[tf]' (tensorflow-cpu, tf2onnx)")

import surgery  # noqa: E402
from surgery.errors import ModelLoadError  # noqa: E402
from surgery.io import load_model  # noqa: E402

from helpers import check_pruned_equals_masked, rel_err  # noqa: E402

_PRELUDE = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, keras, tensorflow as tf
keras.utils.set_random_seed(0)
def ref(model, name, shape):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    y = model(x, training=False)
    np.save(name + "_x.npy", x)
    np.save(name + "_y.npy", np.asarray(y))
"""


def build(tmp_path, body: str) -> None:
    """Run TensorFlow code in a child process (cwd ``tmp_path``)."""
    code = _PRELUDE + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]


def tf_reference(tmp_path, name):
    """(NCHW input, TF output) saved by ``ref``."""
    x = np.load(tmp_path / f"{name}_x.npy")
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous() if x.ndim == 4 else torch.from_numpy(x)
    return x, torch.from_numpy(np.load(tmp_path / f"{name}_y.npy"))


def assert_no_tensorflow_here():
    assert not {"tensorflow", "tf2onnx", "keras"} & set(sys.modules)


_FUNCTIONAL = """
inp = keras.Input((12, 12, 3))
h = keras.layers.Conv2D(8, 3, padding="same")(inp)
h = keras.layers.BatchNormalization()(h)
h = keras.layers.ReLU()(h)
h = keras.layers.ZeroPadding2D(1)(h)
h = keras.layers.Conv2D(6, 3, strides=2, activation="relu")(h)
h = keras.layers.Flatten()(h)
h = keras.layers.Dense(10, activation="relu")(h)
out = keras.layers.Dense(4)(h)
model = keras.Model(inp, out)
for layer in model.layers:  # non-trivial BN statistics and biases
    for w in layer.weights:
        w.assign(np.random.default_rng(len(w.name)).uniform(0.5, 1.5, w.shape).astype(np.float32)
                 if "variance" in w.path else np.random.default_rng(3).normal(0, 0.3, w.shape).astype(np.float32))
model.save("functional.keras")
ref(model, "functional", (1, 12, 12, 3))
"""


def check_tf_model(tmp_path, path, name, tol=1e-5):
    model, shape, source = load_model(str(path))
    x, y = tf_reference(tmp_path, name)
    assert shape == tuple(x.shape) and source == f"TensorFlow model {path}"
    with torch.no_grad():
        assert rel_err(model(x), y) < tol
    plan, pruned, _ = check_pruned_equals_masked(model, x, method="l1", ratio=0.5)
    assert_no_tensorflow_here()
    return model, plan, pruned


@needs_tf
def test_keras_functional(tmp_path):
    """Conv, BN, ZeroPadding, Flatten (Shape/Gather/Concat/Reshape in ONNX) and Dense: all prune."""
    build(tmp_path, _FUNCTIONAL)
    _, plan, pruned = check_tf_model(tmp_path, tmp_path / "functional.keras", "functional")
    assert sorted(g.size for g in plan.groups) == [6, 8, 10]
    x, _ = tf_reference(tmp_path, "functional")
    assert pruned(x).shape == (1, 4)


@pytest.mark.parametrize("name, data, message", [
    ("broken.keras", b"PK\x03\x04 not really a zip", "not a Keras archive (a .keras file is a zip archive)"),
    ("broken.h5", b"plain text", "not an HDF5 file"),
])
def test_bad_keras_file_is_one_line(tmp_path, name, data, message):
    """Refused before any TensorFlow starts (so this runs without the tf extra too)."""
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ModelLoadError) as exc:
        load_model(str(path))
    assert str(exc.value) == f"{path}: {message}"
    assert path.read_bytes() == data
    assert_no_tensorflow_here()


@pytest.mark.slow
@needs_tf
def test_tensorflow_error_is_one_line(tmp_path):
    """A zip that is no Keras model: TensorFlow's own complaint, as one line."""
    import zipfile

    path = tmp_path / "empty.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "not a model")
    with pytest.raises(ModelLoadError) as exc:
        load_model(str(path))
    text = str(exc.value)
    assert text.startswith(f"{path}: cannot convert with TensorFlow (") and "\n" not in text
    assert_no_tensorflow_here()


@pytest.mark.slow
@needs_tf
def test_sequential_h5_savedmodel_and_frozen_graph(tmp_path):
    """A Sequential model (tf2onnx's from_keras fails on those) as .h5, as a SavedModel directory
    and as a frozen .pb graph."""
    build(tmp_path, """
        model = keras.Sequential([keras.Input((10, 10, 3)), keras.layers.Conv2D(8, 3, activation="relu"),
                                  keras.layers.MaxPooling2D(), keras.layers.Conv2D(6, 3, activation="relu"),
                                  keras.layers.Flatten(), keras.layers.Dense(5)])
        model.save("seq.h5")
        model.export("seq_saved", verbose=False)
        ref(model, "seq", (1, 10, 10, 3))
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
        fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(tf.TensorSpec((None, 10, 10, 3), tf.float32))
        frozen = convert_variables_to_constants_v2(fn)
        tf.io.write_graph(frozen.graph.as_graph_def(), ".", "seq.pb", as_text=False)
    """)
    for path in ("seq.h5", "seq_saved", "seq.pb"):
        _, plan, _ = check_tf_model(tmp_path, tmp_path / path, "seq")
        assert sorted(g.size for g in plan.groups) == [6, 8], path


@pytest.mark.slow
@needs_tf
@pytest.mark.parametrize("app, size", [("ResNet50", 64), ("MobileNetV2", 96)])
def test_keras_applications_to_pruned_onnx(tmp_path, app, size):
    """Acceptance: keras.applications (random weights) -> surgery -> l1 at 0.5 -> ONNX, and
    onnxruntime computes what the pruned PyTorch model computes."""
    import onnxruntime as ort

    build(tmp_path, f"""
        model = keras.applications.{app}(weights=None, input_shape=({size}, {size}, 3), classes=10)
        model.save("app.keras")
        ref(model, "app", (1, {size}, {size}, 3))
    """)
    model, shape, _ = load_model(str(tmp_path / "app.keras"))
    x, y = tf_reference(tmp_path, "app")
    assert shape == (1, 3, size, size)
    with torch.no_grad():
        assert rel_err(model(x), y) < 1e-4
    plan, pruned, _ = check_pruned_equals_masked(model, x, method="l1", ratio=0.5)
    assert len(plan.groups) >= 10
    path = surgery.export(pruned, tmp_path / "pruned.onnx", example_inputs=x)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert rel_err(torch.from_numpy(got), pruned(x)) < 1e-4
    assert_no_tensorflow_here()
