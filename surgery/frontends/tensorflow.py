"""TensorFlow / Keras in: convert to ONNX in a subprocess, then the ONNX front end.

    .keras / .h5 / SavedModel directory / frozen .pb
        -> python surgery/frontends/_tf_worker.py (tf2onnx, opset <= 17, NCHW input)
        -> surgery.frontends.onnx.convert (shape folding, onnx2torch, weights as parameters)

TensorFlow never enters this process: TF >= 2.20 crashes in a process that has also loaded
torch's compiler stack, so the conversion runs in a child Python (the same interpreter) and only
an ONNX file comes back. Needs ``pip install -e '.[tf]'`` (tensorflow-cpu, tf2onnx).

Input shapes are given and returned in PyTorch's NCHW order; a Keras model's own static input
shape (NHWC) is read by the worker, with a batch of 1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import zipfile

from ..errors import ModelLoadError

__all__ = ["is_tensorflow_model", "load_tensorflow", "to_onnx", "OPSET", "TIMEOUT"]

OPSET = 17
TIMEOUT = 900  # seconds for one conversion (a ResNet50 takes well under a minute)
_SUFFIXES = (".keras", ".h5", ".hdf5", ".pb")


def is_tensorflow_model(path: str) -> bool:
    """A ``.keras``/``.h5`` file, a frozen ``.pb`` graph, or a SavedModel directory."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "saved_model.pb"))
    return path.lower().endswith(_SUFFIXES)


def _worker_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    return env


def _check_file(path: str) -> None:
    """What can be told without TensorFlow: a ``.keras`` file is a zip archive, an ``.h5`` is HDF5."""
    if os.path.isdir(path):
        return
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(8)
    lower = path.lower()
    if lower.endswith(".keras") and not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path}: not a Keras archive (a .keras file is a zip archive)")
    if lower.endswith((".h5", ".hdf5")) and head != b"\x89HDF\r\n\x1a\n":
        raise ModelLoadError(f"{path}: not an HDF5 file")
    if not head:
        raise ModelLoadError(f"{path} is empty")


def to_onnx(path: str, out: str, shape: tuple[int, ...] | None = None, opset: int = OPSET) -> tuple[int, ...]:
    """Convert the TF/Keras model at ``path`` to the ONNX file ``out`` (NCHW input) in a subprocess;
    returns the NCHW input shape the conversion used."""
    _check_file(path)
    if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("tf2onnx") is None:
        raise ModelLoadError(f"{path}: TensorFlow/Keras models need tensorflow and tf2onnx (pip install -e '.[tf]')")
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_tf_worker.py")  # a script: no torch import
    cmd = [sys.executable, worker, os.path.abspath(path), out, "--opset", str(opset)]
    if shape is not None:
        cmd += ["--input-shape", ",".join(str(int(s)) for s in shape)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_worker_env())
    except subprocess.TimeoutExpired:
        raise ModelLoadError(f"{path}: the TensorFlow conversion took longer than {TIMEOUT} s") from None
    lines = [ln.strip() for ln in done.stdout.splitlines() if ln.strip()]
    if done.returncode != 0:
        errors = [ln.strip() for ln in done.stderr.splitlines() if ln.startswith("surgery-error: ")]
        if errors:
            raise ModelLoadError(errors[-1].removeprefix("surgery-error: "))
        tail = next((ln.strip() for ln in reversed(done.stderr.splitlines()) if ln.strip()), f"exit code {done.returncode}")
        raise ModelLoadError(f"{path}: the TensorFlow conversion failed ({tail})")
    try:
        info = json.loads(lines[-1])
        return tuple(int(s) for s in info["input_shape"])
    except (IndexError, KeyError, TypeError, ValueError):
        raise ModelLoadError(f"{path}: the TensorFlow conversion gave no result") from None


def load_tensorflow(path: str, shape: tuple[int, ...] | None = None):
    """``(GraphModule, NCHW input shape)`` for a TF/Keras model file or SavedModel directory."""
    import onnx

    from .onnx import convert

    with tempfile.TemporaryDirectory(prefix="surgery-tf-") as tmp:
        out = os.path.join(tmp, "model.onnx")
        used = to_onnx(path, out, shape)
        model = onnx.load(out)
    return convert(model, shape or used, path)
