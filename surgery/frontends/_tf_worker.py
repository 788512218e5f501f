"""Child process of ``surgery.frontends.tensorflow``: one TF/Keras model -> one ONNX file.

Run as a script (``python _tf_worker.py SRC OUT.onnx [--opset 17] [--input-shape N,C,H,W]``), never
imported: it must not import torch or surgery, so TensorFlow has the process to itself. Prints one
JSON line ``{"input_shape": [N, C, H, W]}`` (NCHW) on success; on failure one ``surgery-error: ...``
line on stderr and exit code 1.

* ``.keras`` / ``.h5``: ``keras.models.load_model``, wrapped in a ``tf.function`` (tf2onnx's
  ``from_keras`` fails on Sequential models), converted with ``tf2onnx.convert.from_function``.
* SavedModel directory: its ``serving_default`` signature, the same way.
* frozen ``.pb``: ``tf2onnx.convert.from_graph_def``; inputs are the placeholders, outputs the
  nodes nothing reads.

The batch dim stays symbolic in the ONNX file; 4-D inputs are made NCHW (``inputs_as_nchw``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# run as a script, this folder is sys.path[0]: its onnx.py / tensorflow.py would shadow the real packages
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


class WorkerError(Exception):
    """A one-line failure for the parent."""


def _nhwc(shape):
    """NCHW (PyTorch order) -> NHWC for 4-D shapes; others unchanged."""
    return [shape[0], *shape[2:], shape[1]] if len(shape) == 4 else list(shape)


def _nchw(shape):
    return [shape[0], shape[-1], *shape[1:-1]] if len(shape) == 4 else list(shape)


def _spec_shape(model_shape, given, src):
    """The NHWC signature shape: symbolic batch, the model's own dims, or ``given`` (NCHW)."""
    if given is not None:
        want = _nhwc(given)
        if len(want) != len(model_shape) or any(m is not None and m != w for m, w in zip(model_shape[1:], want[1:])):
            raise WorkerError(f"{src}: input shape {tuple(given)} (NCHW) does not fit the model's input "
                              f"{tuple('?' if d is None else d for d in _nchw(list(model_shape)))} (NCHW)")
        return [None, *want[1:]], want
    if any(d is None for d in model_shape[1:]):
        raise WorkerError(f"{src}: the model's input {tuple('?' if d is None else d for d in model_shape)} (NHWC) "
                          f"has free dims; pass --input-shape (input_shape=) in NCHW order")
    return [None, *model_shape[1:]], [1, *model_shape[1:]]


def _one_input(specs, src):
    if len(specs) != 1:
        raise WorkerError(f"{src} has {len(specs)} inputs; surgery loads models with exactly one input")
    return specs[0]


def _convert_function(call, model_shape, dtype, given, out, opset, src):
    import tensorflow as tf
    import tf2onnx

    sig_shape, used = _spec_shape(list(model_shape), given, src)
    spec = (tf.TensorSpec(sig_shape, dtype, name="input"),)
    fn = tf.function(call, input_signature=spec)
    nchw = ["input:0"] if len(sig_shape) == 4 else None
    tf2onnx.convert.from_function(fn, input_signature=spec, opset=opset, inputs_as_nchw=nchw, output_path=out)
    return used


def _keras(path, given, out, opset):
    import keras

    model = keras.models.load_model(path, compile=False)
    inp = _one_input(list(model.inputs), path)
    return _convert_function(lambda x: model(x, training=False), tuple(inp.shape), inp.dtype, given, out, opset, path)


def _saved_model(path, given, out, opset):
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    if "serving_default" not in loaded.signatures:
        raise WorkerError(f"{path}: the SavedModel has no serving_default signature")
    sig = loaded.signatures["serving_default"]
    args, kwargs = sig.structured_input_signature
    name, spec = _one_input(list(kwargs.items()) or [(None, a) for a in args], path)

    def call(x):
        result = sig(**{name: x}) if name else sig(x)
        return [result[k] for k in sorted(result)] if isinstance(result, dict) else result

    return _convert_function(call, tuple(spec.shape), spec.dtype, given, out, opset, path)


def _frozen_graph(path, given, out, opset):
    import tensorflow as tf
    import tf2onnx

    graph_def = tf.compat.v1.GraphDef()
    with open(path, "rb") as f:
        try:
            graph_def.ParseFromString(f.read())
        except Exception as exc:  # noqa: BLE001
            raise WorkerError(f"{path}: not a frozen TensorFlow graph ({type(exc).__name__})") from None
    placeholders = [n for n in graph_def.node if n.op == "Placeholder"]
    node = _one_input(placeholders, path)
    read = {i.split(":")[0].lstrip("^") for n in graph_def.node for i in n.input}
    outputs = [n.name for n in graph_def.node if n.name not in read and n.op not in ("Const", "NoOp", "Placeholder")]
    if not outputs:
        raise WorkerError(f"{path}: the frozen graph has no output node")
    dims = [None if d.size < 0 else int(d.size) for d in node.attr["shape"].shape.dim]
    _, used = _spec_shape(dims, given, path)
    nchw = [f"{node.name}:0"] if len(dims) == 4 else None
    tf2onnx.convert.from_graph_def(graph_def, input_names=[f"{node.name}:0"], output_names=[f"{o}:0" for o in outputs],
                                   opset=opset, inputs_as_nchw=nchw, output_path=out)
    return used


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--input-shape", default=None)
    args = ap.parse_args(argv)
    given = [int(s) for s in args.input_shape.split(",")] if args.input_shape else None
    src = args.src
    try:
        if os.path.isdir(src):
            used = _saved_model(src, given, args.out, args.opset)
        elif src.lower().endswith(".pb"):
            used = _frozen_graph(src, given, args.out, args.opset)
        else:
            used = _keras(src, given, args.out, args.opset)
    except WorkerError as exc:
        print(f"surgery-error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001  (TF's own errors: first line, for the parent's one-line error)
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        print(f"surgery-error: {src}: cannot convert with TensorFlow ({type(exc).__name__}: {first})"[:400], file=sys.stderr)
        return 1
    print(json.dumps({"input_shape": _nchw(used)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
