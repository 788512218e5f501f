"""Front ends that read models from other frameworks' files into ``torch.fx`` graphs.

:func:`load` is ``surgery.load``: a Caffe ``.prototxt`` (with ``weights=`` a ``.caffemodel``) goes to
:mod:`surgery.frontends.caffe`; an ``.onnx`` file to :mod:`surgery.frontends.onnx`; a Keras/TensorFlow
model (``.keras``, ``.h5``, frozen ``.pb``, SavedModel directory) to :mod:`surgery.frontends.tensorflow`
(converted in a subprocess); any other path is a surgery checkpoint (:func:`surgery.checkpoint.load`).
The front ends import lazily, so ``import surgery`` does not pay for them.
"""

from __future__ import annotations

import os

from .. import checkpoint
from ..errors import ModelLoadError

__all__ = ["load"]


def _load_interchange(path: str, input_shape, args, kwargs, weights):
    """An ONNX or TensorFlow model as a ``GraphModule`` (its input shape in ``meta["surgery_input_shape"]``)."""
    if args or kwargs or weights is not None:
        extra = [*(repr(a) for a in args), *kwargs, *(["weights"] if weights is not None else [])]
        raise ModelLoadError(f"{path}: an ONNX or TensorFlow model takes only input_shape=, got {', '.join(extra)}")
    if path.lower().endswith(".onnx"):
        from .onnx import load_onnx as load_file
    else:
        from .tensorflow import load_tensorflow as load_file
    model, shape = load_file(path, tuple(input_shape) if input_shape is not None else None)
    model.meta["surgery_input_shape"] = shape
    return model


def load(path, *args, weights=None, input_shape=None, **kwargs):
    """Load a surgery checkpoint, or a Caffe net: ``load("deploy.prototxt", weights="net.caffemodel")``.

    Arguments besides ``weights`` go to :func:`surgery.checkpoint.load` unchanged. ``input_shape``
    fixes the input of an ONNX or TensorFlow model (``load("m.onnx", input_shape=(1, 3, 224, 224))``).
    """
    from .tensorflow import is_tensorflow_model

    if os.fspath(path).lower().endswith(".onnx") or is_tensorflow_model(os.fspath(path)):
        return _load_interchange(os.fspath(path), input_shape, args, kwargs, weights)
    if input_shape is not None:
        raise ModelLoadError(f"{os.fspath(path)}: input_shape= applies to ONNX and TensorFlow models only")
    if os.fspath(path).lower().endswith(".prototxt"):
        if args or kwargs:
            raise ModelLoadError(f"{os.fspath(path)}: a Caffe prototxt takes only weights=, got "
                                 f"{', '.join([*(repr(a) for a in args), *kwargs])}")
        from .caffe import load_caffe

        return load_caffe(path, weights)
    if weights is not None:
        raise ModelLoadError(f"{os.fspath(path)}: weights= applies to a Caffe .prototxt only; a checkpoint holds its weights")
    return checkpoint.load(path, *args, **kwargs)
