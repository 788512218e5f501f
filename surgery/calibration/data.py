"""Calibration batches from what a user has.

API (``data=``): a tensor of inputs (split into batches), an ``(x, y)`` tuple of tensors, an iterable
of tensors or of ``(x, y)`` pairs (a ``DataLoader``), or a :class:`Calibration`.

Command line (``--data``): ``digits`` (scikit-learn's 1,797 handwritten digits, resized to the
model's input), an image folder in ``ImageFolder`` layout (resized to the input size, scaled to
[0, 1], no mean/std normalisation), or an ``.npz`` / ``.pt`` file holding ``x`` (and ``y``); the
``.pt`` file is read with ``weights_only=True``.

Examples
--------
>>> import torch
>>> cal = Calibration((torch.randn(10, 3), torch.arange(10)), batch_size=4)
>>> [(tuple(x[0].shape), None if y is None else y.tolist()) for x, y in cal]
[((4, 3), [0, 1, 2, 3]), ((4, 3), [4, 5, 6, 7]), ((2, 3), [8, 9])]
>>> cal.has_labels, Calibration(torch.randn(5, 3), max_batches=1).has_labels
(True, False)
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SurgeryError

__all__ = ["Calibration", "DataError", "load_data", "digits"]

Batch = tuple[tuple[torch.Tensor, ...], "torch.Tensor | None"]


class DataError(SurgeryError):
    """Calibration or training data could not be read or has the wrong form."""


def _is_labels(y) -> bool:
    return isinstance(y, torch.Tensor) and not y.is_floating_point() and y.dim() == 1


class Calibration:
    """Re-iterable calibration batches ``((inputs...), labels or None)``, at most ``max_batches``."""

    def __init__(self, data, *, max_batches: int | None = None, batch_size: int | None = None,
                 exact_batch: int | None = None):
        if isinstance(data, Calibration):
            batch_size = batch_size or data.batch_size
            max_batches = max_batches or data.max_batches
            exact_batch = exact_batch or data.exact_batch
            data = data.data
        self.exact_batch = exact_batch
        batch_size = 32 if batch_size is None else batch_size
        if data is None:
            raise DataError("no calibration data given")
        if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
            raise DataError(f"calib_batches must be a positive integer, got {max_batches!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch size must be a positive integer, got {batch_size!r}")
        self.data = data
        self.max_batches = max_batches
        self.batch_size = batch_size
        self._first: Batch | None = None
        if isinstance(data, (str, bytes, dict)) or not (isinstance(data, torch.Tensor) or hasattr(data, "__iter__")):
            raise DataError(f"data must be a tensor, an (x, y) tuple or an iterable of batches, got {type(data).__name__}")

    def _raw(self) -> Iterator[Batch]:
        d = self.data
        if isinstance(d, torch.Tensor):
            for x in d.split(self.batch_size):
                yield (x,), None
            return
        if isinstance(d, tuple) and len(d) == 2 and isinstance(d[0], torch.Tensor) and _is_labels(d[1]):
            x, y = d
            if len(x) != len(y):
                raise DataError(f"x has {len(x)} samples but y has {len(y)}")
            for xb, yb in zip(x.split(self.batch_size), y.split(self.batch_size)):
                yield (xb,), yb
            return
        for item in d:
            yield _as_batch(item)

    def _exact(self, it: Iterator[Batch]) -> Iterator[Batch]:
        """Re-cut batches into pieces of exactly ``exact_batch`` samples (a graph traced by
        ``torch.export`` is fixed to its example's batch size); a last, shorter piece is dropped."""
        k = self.exact_batch
        for inputs, labels in it:
            for start in range(0, len(inputs[0]) - k + 1, k):
                yield tuple(x[start : start + k] for x in inputs), None if labels is None else labels[start : start + k]

    def __iter__(self) -> Iterator[Batch]:
        it = self._raw()
        if self.exact_batch:
            it = self._exact(it)
        if self.max_batches is not None:
            it = itertools.islice(it, self.max_batches)
        n = 0
        for batch in it:
            n += 1
            yield batch
        if n == 0:
            raise DataError("the calibration data holds no batch")

    def first(self) -> Batch:
        if self._first is None:
            self._first = next(iter(self))
        return self._first

    @property
    def has_labels(self) -> bool:
        return self.first()[1] is not None

    def __len__(self) -> int:
        d = self.data
        if isinstance(d, torch.Tensor):
            n = -(-len(d) // self.batch_size)
        elif isinstance(d, tuple) and len(d) == 2 and isinstance(d[0], torch.Tensor) and _is_labels(d[1]):
            n = -(-len(d[0]) // self.batch_size)
        else:
            try:
                n = len(d)
            except TypeError:
                n = self.max_batches or 0
        return min(n, self.max_batches) if self.max_batches else n


def _as_batch(item) -> Batch:
    if isinstance(item, torch.Tensor):
        return (item,), None
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (tuple, list)) \
            and item[0] and all(isinstance(t, torch.Tensor) for t in item[0]):
        if item[1] is None or isinstance(item[1], torch.Tensor):
            return tuple(item[0]), item[1]  # ((x1, x2, ...), y): a model with several inputs
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor):
        y = item[1]
        if y is None or _is_labels(y):
            return (item[0],), y
        if isinstance(y, torch.Tensor):
            return (item[0],), y  # regression targets: used by a loss callable only
    if isinstance(item, (tuple, list)) and item and all(isinstance(t, torch.Tensor) for t in item):
        return tuple(item), None
    raise DataError(f"a calibration batch must be a tensor or an (x, y) pair of tensors, got {type(item).__name__}")


# -- files and built-in sets (command line) ------------------------------------------------------
def digits(input_shape=(1, 1, 16, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as ``(x, y)``: resized to ``input_shape``'s H x W, channels repeated,
    standardised by the global mean and std (how ``samples/demo.py`` trains)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if len(input_shape) == 4:
        x = F.interpolate(x, size=tuple(input_shape[2:]), mode="bilinear", align_corners=False)
        x = x.expand(-1, input_shape[1], -1, -1).contiguous()
    else:
        raise DataError(f"the built-in digits are images; the model takes input shape {tuple(input_shape)}")
    x = (x - x.mean()) / x.std()
    return x, torch.tensor(d.target, dtype=torch.long)


def _image_folder(path: str, input_shape) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from torchvision import datasets, transforms
    except ImportError:  # pragma: no cover - torchvision is a dependency
        raise DataError("an image folder needs torchvision") from None
    if len(input_shape) != 4:
        raise DataError(f"an image folder needs a model with image input, got input shape {tuple(input_shape)}")
    channels = input_shape[1]
    tf = transforms.Compose([
        transforms.Grayscale(1) if channels == 1 else transforms.Lambda(lambda im: im.convert("RGB")),
        transforms.Resize(tuple(input_shape[2:])), transforms.ToTensor(),
    ])
    try:
        ds = datasets.ImageFolder(path, transform=tf)
        pairs = [ds[i] for i in range(len(ds))]
    except (FileNotFoundError, OSError, RuntimeError) as exc:
        raise DataError(f"cannot read image folder {path}: {str(exc).splitlines()[0]}") from None
    x = torch.stack([p[0] for p in pairs])
    if x.shape[1] != channels:
        raise DataError(f"images in {path} have {x.shape[1]} channels, the model takes {channels}")
    return x, torch.tensor([p[1] for p in pairs], dtype=torch.long)


def _xy(obj, path: str):
    if isinstance(obj, torch.Tensor):
        return obj, None
    if not hasattr(obj, "keys") or "x" not in obj.keys():
        raise DataError(f"{path} must hold an array 'x' (and optionally 'y')")
    x = torch.as_tensor(np.asarray(obj["x"])) if not isinstance(obj["x"], torch.Tensor) else obj["x"]
    y = obj["y"] if "y" in obj.keys() else None
    if y is not None:
        y = torch.as_tensor(np.asarray(y)) if not isinstance(y, torch.Tensor) else y
        if len(y) != len(x):
            raise DataError(f"{path}: x has {len(x)} samples but y has {len(y)}")
        if not y.is_floating_point():
            y = y.long()
    if x.dtype == torch.float64 or not x.is_floating_point():
        x = x.float()
    return x, y


def load_data(spec: str, input_shape) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``--data SPEC`` -> ``(x, y or None)``; every failure is one :class:`DataError` line."""
    if spec == "digits":
        return digits(input_shape)
    if os.path.isdir(spec):
        return _image_folder(spec, input_shape)
    if not os.path.exists(spec):
        raise DataError(f"data {spec!r} not found (expected 'digits', an image folder, or an .npz/.pt file)")
    low = spec.lower()
    try:
        if low.endswith(".npz"):
            with np.load(spec, allow_pickle=False) as z:
                return _xy({k: z[k] for k in z.files}, spec)
        if low.endswith((".pt", ".pth")):
            return _xy(torch.load(spec, map_location="cpu", weights_only=True), spec)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read data {spec}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    raise DataError(f"unknown data format {spec!r} (expected 'digits', an image folder, .npz or .pt)")
