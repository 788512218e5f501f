"""Front ends that read models from other frameworks' files into ``torch.fx`` graphs.

:func:`load` is ``surgery.load``: a Caffe ``.prototxt`` (with ``weights=`` a ``.caffemodel``) goes to
:mod:`surgery.frontends.caffe`; any other path is a surgery checkpoint (:func:`surgery.checkpoint.load`).
The front ends import lazily, so ``import surgery`` does not pay for them.
"""

from __future__ import annotations

import os

from .. import checkpoint
from ..errors import ModelLoadError

__all__ = ["load"]


def load(path, *args, weights=None, **kwargs):
    """Load a surgery checkpoint, or a Caffe net: ``load("deploy.prototxt", weights="net.caffemodel")``.

    Arguments besides ``weights`` go to :func:`surgery.checkpoint.load` unchanged.
    """
    if os.fspath(path).lower().endswith(".prototxt"):
        if args or kwargs:
            raise ModelLoadError(f"{os.fspath(path)}: a Caffe prototxt takes only weights=, got "
                                 f"{', '.join([*(repr(a) for a in args), *kwargs])}")
        from .caffe import load_caffe

        return load_caffe(path, weights)
    if weights is not None:
        raise ModelLoadError(f"{os.fspath(path)}: weights= applies to a Caffe .prototxt only; a checkpoint holds its weights")
    return checkpoint.load(path, *args, **kwargs)
