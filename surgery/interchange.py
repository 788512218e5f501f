"""Export out: a model (a pruned result, a reloaded checkpoint, any module) to ONNX or ``.pt2``.

    surgery.export(model, "m.onnx", example_inputs=x)                     # ONNX, torch's dynamo exporter
    surgery.export(model, "m.onnx", example_inputs=x, dynamic_batch=True) # any batch size
    surgery.export(model, "m.pt2", format="pt2", example_inputs=x)        # torch.export.save

``.pt2`` is ``torch.export`` + ``torch.export.save``. ONNX at opset 18 and above (the default) is
torch's dynamo exporter (``torch.export``, then onnxscript), which handles module trees and
``GraphModule`` results alike; below 18 (which that exporter cannot write: onnx's version converter
breaks its reductions), or for a model ``torch.export`` cannot capture (a data-dependent layer such
as ``StripeConv``, whose stripe layout lives in buffers), the TorchScript exporter writes it, with
named inputs and outputs (``input_0``, ``output_0``, ...; it needs them for ``GraphModule`` s).
``dynamic_batch`` makes dim 0 of every input dynamic: a model whose graph holds its batch size as
a literal (an ONNX import folded for one shape) cannot have one and says so; a TorchScript-exported
file is checked in onnxruntime at batch 2 against PyTorch. Files are written atomically (a
temporary file in the same folder, renamed when complete); the model is not modified.

Examples
--------
>>> import os, tempfile, torch
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
>>> x = torch.randn(1, 3, 8, 8)
>>> with tempfile.TemporaryDirectory() as d:
...     path = export(net, os.path.join(d, "net.pt2"), format="pt2", example_inputs=x)
...     y = torch.export.load(os.path.join(d, "net.pt2")).module()(x)
>>> bool(torch.equal(y, net(x)))
True
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings

import torch
from torch import nn

from ._files import atomic_write
from .errors import ExportError

__all__ = ["export", "FORMATS", "DEFAULT_OPSET"]

FORMATS = ("onnx", "pt2")
DEFAULT_OPSET = 18  # the dynamo exporter's lowest; below it the TorchScript exporter writes the file


def _one_line(exc: BaseException) -> str:
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _inputs(example_inputs) -> tuple:
    if example_inputs is None:
        raise ExportError("export needs example_inputs (a tensor or a tuple of tensors)")
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ExportError("example_inputs must be a tensor or a tuple of tensors")
    return tuple(inputs)


def _dynamic_shapes(inputs: tuple, dynamic_batch: bool):
    if not dynamic_batch:
        return None
    batch = torch.export.Dim("batch", min=1)
    return tuple({0: batch} if t.dim() > 0 else None for t in inputs)


@contextlib.contextmanager
def _quiet():
    """torch.export and the ONNX exporter print progress, warnings and their own error logs; keep them
    out of the way (a failure comes back as one ExportError line)."""
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def _exported(model: nn.Module, inputs: tuple, dynamic_batch: bool):
    if dynamic_batch:  # torch.export specialises a size-1 dim: trace at batch 2
        inputs = tuple(torch.cat([t, t]) if t.dim() > 0 and t.shape[0] == 1 else t for t in inputs)
    try:
        return torch.export.export(model, inputs, dynamic_shapes=_dynamic_shapes(inputs, dynamic_batch), strict=False)
    except Exception as exc:
        if dynamic_batch:
            raise ExportError(f"cannot export with a dynamic batch (the model fixes its batch size: "
                              f"{_one_line(exc)}); export without dynamic_batch") from None
        raise ExportError(f"torch.export cannot capture the model ({_one_line(exc)})") from None


def _names(model: nn.Module, inputs: tuple) -> tuple[list[str], list[str]]:
    from .module_tree import output_tensors

    with torch.no_grad():
        n_out = len(output_tensors(model(*inputs)))
    return [f"input_{i}" for i in range(len(inputs))], [f"output_{i}" for i in range(n_out)]


def _write_torchscript_onnx(model: nn.Module, inputs: tuple, tmp: str, opset: int, dynamic_batch: bool) -> None:
    ins, outs = _names(model, inputs)
    axes = {name: {0: "batch"} for name in ins + outs} if dynamic_batch else None
    try:
        torch.onnx.export(model, inputs, tmp, dynamo=False, opset_version=opset, input_names=ins, output_names=outs,
                          dynamic_axes=axes)
    except Exception as exc:
        raise ExportError(f"the TorchScript ONNX exporter failed at opset {opset} ({_one_line(exc)})") from None
    if dynamic_batch:
        _check_batch(model, inputs, tmp)


def _check_batch(model: nn.Module, inputs: tuple, path: str) -> None:
    """A traced file may hold the example's batch size: run batch 2 in onnxruntime against PyTorch."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("checking a dynamic batch needs onnxruntime (pip install -e '.[onnx]')") from None
    from .module_tree import output_tensors

    twice = tuple(torch.cat([t, t]) if t.dim() > 0 else t for t in inputs)
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = session.run(None, {f"input_{i}": t.numpy() for i, t in enumerate(twice)})
    except Exception as exc:
        raise ExportError(f"cannot export with a dynamic batch (the exported file fails at batch 2: {_one_line(exc)}); "
                          f"export without dynamic_batch") from None
    with torch.no_grad():
        want = output_tensors(model(*twice))
    for g, w in zip(got, want, strict=True):
        if tuple(g.shape) != tuple(w.shape) or not torch.allclose(torch.from_numpy(g), w, rtol=1e-3, atol=1e-4):
            raise ExportError("cannot export with a dynamic batch (the exported file computes something else at "
                              "batch 2); export without dynamic_batch")


def _write_onnx(program, inputs: tuple, tmp: str, opset: int) -> None:
    try:
        onnx_program = torch.onnx.export(program, inputs, dynamo=True, opset_version=opset, optimize=True,
                                         external_data=False, verbose=False)
    except Exception as exc:
        raise ExportError(f"the ONNX exporter failed at opset {opset} ({_one_line(exc)})") from None
    if onnx_program is None:
        raise ExportError("the ONNX exporter returned nothing")
    onnx_program.save(tmp)


def export(model: nn.Module, path, format: str = "onnx", example_inputs=None, opset: int | None = None,
           dynamic_batch: bool = False) -> str:
    """Write ``model`` to ``path`` as ONNX (``format="onnx"``) or a ``torch.export`` program (``"pt2"``).

    ``example_inputs`` is a tensor or a tuple of tensors; ``opset`` defaults to
    :data:`DEFAULT_OPSET`; ``dynamic_batch`` lets dim 0 of every input take any size. Returns the
    path written. Raises :class:`~surgery.errors.SurgeryError` with one line on failure, leaving no
    file behind.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; known formats: {', '.join(FORMATS)}")
    if not isinstance(model, nn.Module):
        raise ExportError(f"expected an nn.Module, got {type(model).__name__}")
    if opset is not None and format != "onnx":
        raise ExportError("opset applies to ONNX export only")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if format == "onnx" and not 7 <= opset <= 23:
        raise ExportError(f"opset must be between 7 and 23, got {opset}")
    inputs = _inputs(example_inputs)
    path = os.fspath(path)
    net = copy.deepcopy(model).eval()  # export may touch module state; the caller's model stays as it is
    with _quiet():
        if format == "onnx" and opset < DEFAULT_OPSET:
            atomic_write(path, lambda tmp: _write_torchscript_onnx(net, inputs, tmp, opset, dynamic_batch))
            return path
        try:
            program = _exported(net, inputs, dynamic_batch)
        except ExportError as exc:
            if format == "pt2" or str(exc).startswith("cannot export with a dynamic batch"):
                raise
            atomic_write(path, lambda tmp: _write_torchscript_onnx(net, inputs, tmp, opset, dynamic_batch))
            return path
        if format == "pt2":
            atomic_write(path, lambda tmp: torch.export.save(program, tmp))
        else:
            atomic_write(path, lambda tmp: _write_onnx(program, inputs, tmp, opset))
    return path
