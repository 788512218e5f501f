"""Dense (and CSR) checkpoints: one safetensors file that reloads without source code or pickle.

Format (``format_version`` 2; version 1 files still load): a single `safetensors <https://github.com/huggingface/safetensors>`_
file. Its string metadata holds

* ``"format"``: ``"surgery.dense"`` or ``"surgery.csr"``, ``"format_version"``: ``"2"``;
* ``"model"``: JSON of the fx graph and the module tree (see :mod:`surgery._graph_codec`) plus a
  ``"tensors"`` table saying how each stored tensor is laid out (dense, or CSR components); for a
  model that is not a ``GraphModule`` (the user's own class, which :func:`surgery.apply` returns by
  default) also its own class tree (``"tree"``, see :mod:`surgery._module_codec`), sharing tensors;
* ``"metadata"``: JSON of the caller's metadata (source model, method, plan, before/after stats);
* ``"checksum"`` (version 2): ``"sha256:<hex>"`` of the format, model and metadata strings and of
  every stored tensor (name, dtype, shape, bytes). safetensors has none, so without it a flipped bit in
  tensor data would load as a silently different model; a mismatch is a ``ModelLoadError``.

In a ``csr`` file each floating tensor of two or more dimensions is stored as CSR components of its
``(shape[0], -1)`` view (``::crow`` row pointers, ``::col`` column indices, ``::values``) when those
take fewer bytes than the dense tensor, else dense. Column indices are int16 when a row holds at most
32768 entries (every conv/linear weight of common models), else int32 (int64 past 2**31); row
pointers are int32 (int64 past 2**31 non-zeros). At 90% sparsity float32 weights then take about 15%
of their dense bytes (with int64 indices, 30%).

Loading needs only ``torch`` and ``safetensors``: module classes are looked up in ``torch.nn`` (and
``torchvision.ops`` if the model uses them), graph functions in an allow-list; nothing is unpickled.
A stored class tree comes back as the user's class when its classes import from torch, torchvision,
timm, transformers or surgery (others with ``trust=True``), every attribute was storable, and it
computes bit for bit what the stored graph computes on the stored example input shape; otherwise
the graph is returned, with a warning saying why.
Writes are atomic: a temporary file in the target directory, then ``os.replace``.

Examples
--------
>>> import torch, tempfile, os, surgery.checkpoint as ckpt
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
>>> path = os.path.join(tempfile.mkdtemp(), "net.pt")
>>> x = torch.randn(1, 3, 8, 8)
>>> ckpt.save(net, path, metadata={"method": "l1"}, example_inputs=x)
>>> back = ckpt.load(path)
>>> type(back).__name__, torch.equal(back(x), net(x)), ckpt.read_metadata(path)["method"]
('Sequential', True, 'l1')
"""

from __future__ import annotations

import json
import os
import struct
import warnings
import weakref

import torch
import torch.fx
from torch import nn

from . import _graph_codec as codec
from . import _module_codec as tree_codec
from ._files import atomic_write
from ._provenance import example_inputs_of
from ._tensor_layout import TensorStore, checksum, decode_tensors
from .errors import ModelLoadError, SurgeryError

__all__ = ["FORMATS", "OUTPUTS", "save", "load", "read_metadata", "metadata_of", "is_checkpoint", "checksum"]

FORMATS = ("dense", "csr")
OUTPUTS = ("auto", "module", "graph")
FORMAT_VERSION = "2"
_READABLE_VERSIONS = ("1", "2")
_MAX_HEADER = 512 * 1024 * 1024


# -- save ---------------------------------------------------------------------------------------
def _as_graph_module(model: nn.Module, example_inputs) -> torch.fx.GraphModule:
    if isinstance(model, torch.fx.GraphModule):
        return model
    from .dependency_graph.tracing import _symbolic_trace, trace_module

    if example_inputs is not None:
        return trace_module(model, example_inputs)
    return _symbolic_trace(model, ()).to_graph_module()


#: ``GraphModule.meta`` entries that the graph's behaviour depends on (the export front end's batch).
_GRAPH_META = ("surgery_static_batch", "surgery_frontend")


def _check_inputs(example_inputs, metadata):
    if example_inputs is not None:
        return example_inputs
    shape = (metadata or {}).get("input_shape") if isinstance(metadata, dict) else None
    if isinstance(shape, (list, tuple)) and shape and all(isinstance(s, int) and s > 0 for s in shape):
        return torch.empty(tuple(shape))  # only its shape and dtype are stored
    return None


def save(model: nn.Module, path, format: str = "dense", metadata: dict | None = None, *, example_inputs=None) -> None:
    """Save ``model`` as one self-describing file at ``path`` (atomically).

    ``model`` is a ``torch.fx.GraphModule`` or any module that ``torch.fx`` can trace
    (``example_inputs``, when given, are used to trace and check it). For a module that is not a
    ``GraphModule`` (the user's class, as :func:`surgery.apply` returns it) its own class tree is
    stored too, so that :func:`load` can rebuild that class; the shapes of ``example_inputs`` (else
    those :func:`surgery.apply` traced the result with, else ``metadata["input_shape"]``) are kept to
    check it on load. Without any of them only the graph is stored, with a warning.
    ``format="csr"`` stores each floating tensor of two or more dimensions as CSR components where
    they take fewer bytes than the dense tensor (unstructured-sparse weights), else dense; both
    formats load back to the same dense model, bit for bit.
    ``metadata`` must be JSON-serialisable; :func:`read_metadata` returns it.
    """
    if format not in FORMATS:
        raise SurgeryError(f"unknown checkpoint format {format!r}; known formats: {', '.join(FORMATS)}")
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"expected an nn.Module, got {type(model).__name__}")
    if example_inputs is None and not isinstance(model, torch.fx.GraphModule):
        example_inputs = example_inputs_of(model)  # what surgery.apply traced and checked the result with
    gm = _as_graph_module(model, example_inputs)
    store = TensorStore(format)
    spec = {"graph": codec.graph_to_data(gm), "modules": codec.modules_to_data(gm, store.add)}
    if model is not gm:
        inputs = _check_inputs(example_inputs, metadata)
        if tree_codec.inputs_to_data(inputs) is not None:
            spec["tree"] = tree_codec.tree_to_data(model, store.add, inputs)
        else:
            warnings.warn(f"saving {type(model).__name__} as a graph only: its own class is checked on load on the example "
                          f"inputs' shapes, and no tensor or tuple of tensors was given (surgery.load returns a GraphModule)",
                          stacklevel=2)
    if isinstance(model, torch.fx.GraphModule):
        spec["graph_meta"] = {k: v for k, v in model.meta.items() if k in _GRAPH_META and isinstance(v, (bool, str))}
    spec["tensors"] = store.table
    try:
        meta_json = json.dumps(metadata or {})
    except (TypeError, ValueError) as exc:
        raise SurgeryError(f"checkpoint metadata is not JSON-serialisable: {exc}") from None
    header = {"format": f"surgery.{format}", "format_version": FORMAT_VERSION, "model": json.dumps(spec),
              "metadata": meta_json}
    header["checksum"] = checksum(header, store.tensors)
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(store.tensors, tmp, metadata=header))


# -- load ---------------------------------------------------------------------------------------
def _header(path: str) -> dict | None:
    """The safetensors JSON header of ``path``, or ``None`` if the file is not safetensors."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(9)
            if len(head) < 9 or head[8:9] != b"{":
                return None
            (n,) = struct.unpack("<Q", head[:8])
            if n > min(size - 8, _MAX_HEADER):
                return None
            f.seek(8)
            header = json.loads(f.read(n))
            return header if isinstance(header, dict) else None
    except (OSError, ValueError, RecursionError):
        return None


def is_checkpoint(path) -> bool:
    """Whether ``path`` is a surgery checkpoint (checks the header only)."""
    header = _header(os.fspath(path))
    meta = (header or {}).get("__metadata__") or {}
    return isinstance(meta, dict) and str(meta.get("format", "")).startswith("surgery.")


def _read_header_meta(path: str) -> dict:
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    if not is_checkpoint(path):
        raise ModelLoadError(f"{path}: not a surgery checkpoint")
    meta = _header(path)["__metadata__"]
    if meta.get("format_version") not in _READABLE_VERSIONS or meta.get("format") not in ("surgery.dense", "surgery.csr"):
        raise ModelLoadError(f"{path}: unsupported checkpoint format {meta.get('format')} v{meta.get('format_version')}")
    return meta


def read_metadata(path) -> dict:
    """The metadata dict stored by :func:`save` (reads the header only, builds no model)."""
    path = os.fspath(path)
    try:
        return json.loads(_read_header_meta(path).get("metadata") or "{}")
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: checkpoint metadata is corrupt ({exc})") from None


def _adopt_tree(root: nn.Module, gm: torch.fx.GraphModule) -> None:
    """Give ``gm`` the whole stored tree: ``GraphModule`` copies only what the graph references (and
    re-registers ``get_attr`` tensors as persistent buffers), the checkpoint has everything as saved."""
    for key in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
        gm.__dict__[key] = root.__dict__[key]
    for k, v in vars(root).items():
        if isinstance(v, torch.Tensor):
            gm.__dict__[k] = v


#: The metadata of models :func:`load` rebuilt as their own class (a GraphModule keeps it in ``meta``).
_LOADED_METADATA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def metadata_of(model: nn.Module) -> dict:
    """The metadata of the checkpoint ``model`` was loaded from (``{}`` for any other model)."""
    if isinstance(model, torch.fx.GraphModule):
        meta = model.meta.get("surgery")
    else:
        meta = _LOADED_METADATA.get(model)
    return meta if isinstance(meta, dict) else {}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _same_outputs(model: nn.Module, gm: torch.fx.GraphModule, inputs: tuple) -> str:
    """"" when ``model`` and ``gm`` give bit-identical outputs on ``inputs`` (both in eval mode)."""
    import torch.utils._pytree as pytree

    flags = [(m, m.training) for m in (*model.modules(), *gm.modules())]
    try:
        model.eval()
        gm.eval()
        with torch.no_grad():
            try:
                want = pytree.tree_leaves(gm(*inputs))
            except Exception as exc:
                return f"the stored graph fails on the stored example input ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})"
            try:
                got = pytree.tree_leaves(model(*inputs))
            except Exception as exc:
                return f"its forward fails on the stored example input ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})"
    finally:
        for m, flag in flags:
            m.training = flag
    if len(got) != len(want):
        return "its forward returns a different number of outputs than the stored graph"
    for a, b in zip(got, want):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))
        else:
            same = type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b
        if not same:
            return "its outputs differ from the stored graph's on the stored example input"
    return ""


def _own_class(spec: dict, tensors: dict, gm: torch.fx.GraphModule, trust: bool) -> tuple[nn.Module | None, str]:
    tree = spec["tree"]
    model, why = tree_codec.data_to_tree(tree, tensors, trust)
    if model is None:
        return None, why
    if not tree.get("inputs"):
        return None, "the checkpoint has no example input to check it with (pass example_inputs to surgery.save)"
    return (model, "") if not (why := _same_outputs(model, gm, tree_codec.data_to_inputs(tree["inputs"]))) else (None, why)


def load(path, output: str = "auto", *, trust: bool = False) -> nn.Module:
    """Rebuild the model saved at ``path``; its metadata is :func:`metadata_of` the result.

    ``output="auto"``: a model saved as its own class (not a ``GraphModule``) comes back as that
    class when it can (classes from torch, torchvision, timm, transformers or surgery, or any
    importable class with ``trust=True``; every attribute stored; outputs bit-identical to the stored
    graph's on the stored example input shape), else as the ``GraphModule`` with a warning and the
    reason in ``meta["surgery_output"]``. ``"module"`` raises instead of falling back; ``"graph"``
    always returns the ``GraphModule`` (whose ``meta["surgery"]`` holds the metadata).

    Raises :class:`~surgery.errors.ModelLoadError` for a missing, truncated or corrupt file, or one
    that names a module class or function outside the allow-list.
    """
    if output not in OUTPUTS:
        raise SurgeryError(f"unknown output {output!r}; known outputs: {', '.join(OUTPUTS)}")

    path = os.fspath(path)
    meta = _read_header_meta(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        spec = json.loads(meta["model"])
        metadata = json.loads(meta.get("metadata") or "{}")
        if not isinstance(spec, dict):
            raise TypeError(f"model is a {type(spec).__name__}, not an object")
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise ModelLoadError(f"{path}: checkpoint header is corrupt ({exc})") from None
    try:
        raw = load_file(path)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: truncated or corrupt checkpoint ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if meta.get("format_version") != "1" and meta.get("checksum") != checksum(meta, raw):  # version 1 had none
        raise ModelLoadError(f"{path}: checksum mismatch: the file is corrupt (changed after it was written)")
    try:
        tensors = decode_tensors(spec["tensors"], raw)
        root, tensor_names = codec.data_to_modules(spec["modules"], tensors)
        graph = codec.data_to_graph(spec["graph"], tensor_names, *codec.module_paths(root))
        name = str(spec["graph"].get("class_name", "GraphModule"))
        gm = torch.fx.GraphModule(root, graph, name if name.isidentifier() else "GraphModule")
        _adopt_tree(root, gm)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    except Exception as exc:  # a hand-crafted header can fail anywhere; report it in one line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ModelLoadError(f"{path}: corrupt checkpoint ({type(exc).__name__}: {first})") from None
    gm.training = root.training
    graph_meta = spec.get("graph_meta")
    if isinstance(graph_meta, dict):
        gm.meta.update({k: v for k, v in graph_meta.items() if k in _GRAPH_META and isinstance(v, (bool, str))})
    gm.meta["surgery"] = metadata
    if isinstance(metadata, dict) and isinstance(metadata.get("plan"), dict):
        gm.meta["surgery_plan"] = metadata["plan"]
    tree = spec.get("tree")
    if output == "graph" or (tree is None and output == "auto"):
        return gm
    if not isinstance(tree, dict):
        raise ModelLoadError(f"{path}: the checkpoint holds a GraphModule, not a model's own class")
    try:
        model, why = _own_class(spec, tensors, gm, trust)  # shares tensors with gm: only one of the two is returned
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    except Exception as exc:  # a hand-crafted tree can fail anywhere; report it in one line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ModelLoadError(f"{path}: corrupt checkpoint ({type(exc).__name__}: {first})") from None
    if model is not None:
        _LOADED_METADATA[model] = metadata
        return model
    root_class = next((str(e.get("class")) for e in tree.get("modules", []) if isinstance(e, dict) and e.get("path") == ""), "?")
    if output == "module":
        raise ModelLoadError(f"{path}: cannot rebuild {root_class}: {why}")
    warnings.warn(f"{path}: loading a GraphModule instead of {root_class}: {why}", stacklevel=2)
    gm.meta["surgery_output"] = {"output": "graph", "reason": why, "class": root_class}
    return gm
