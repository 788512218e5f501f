"""How a checkpoint's tensors are laid out in the safetensors file: dense, or CSR where smaller.

:class:`TensorStore` collects a model's tensors for saving (each tensor object once, CSR components
when the ``csr`` format makes them smaller), :func:`decode_tensors` turns the stored components back
into dense tensors after checking every CSR invariant, and :func:`checksum` covers the header and
every stored tensor. The file format itself is described in :mod:`surgery.checkpoint`.
"""

from __future__ import annotations

import hashlib

import torch

from .errors import ModelLoadError, SurgeryError

__all__ = ["TensorStore", "checksum", "decode_tensors"]


class TensorStore:
    """Collects tensors under unique keys; a tensor object seen twice is stored once."""

    def __init__(self, layout: str):
        self.layout = layout
        self.tensors: dict[str, torch.Tensor] = {}
        self.table: dict[str, dict] = {}
        self._by_id: dict[int, str] = {}
        self._storages: set[int] = set()

    def add(self, t: torch.Tensor, key: str) -> str:
        if id(t) in self._by_id:
            return self._by_id[id(t)]
        if t.device.type == "meta" or t.is_sparse or t.is_quantized:
            raise SurgeryError(f"cannot store tensor {key!r}: {t.device.type if t.device.type == 'meta' else t.layout} tensors are not supported")
        key = key.replace("::", "__")
        while key in self.table:
            key += "_"
        self._by_id[id(t)] = key
        t = t.detach().cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if not t.is_contiguous() or (ptr is not None and ptr in self._storages) or t.numel() != t.untyped_storage().nbytes() // max(1, t.element_size()):
            t = t.contiguous().clone()
        if ptr is not None:
            self._storages.add(ptr)
        parts = _csr_parts(t) if self.layout == "csr" else None
        if parts is not None:
            for suffix, part in zip(("crow", "col", "values"), parts):
                self.tensors[f"{key}::{suffix}"] = part
            self.table[key] = {"layout": "csr", "shape": list(t.shape)}
        else:
            self.tensors[key] = t
            self.table[key] = {"layout": "dense"}
        return key


def _index_dtype(bound: int, small: bool = False) -> torch.dtype:
    """The narrowest signed integer dtype holding every value in ``[0, bound]`` (int16 only if ``small``)."""
    if small and bound <= torch.iinfo(torch.int16).max:
        return torch.int16
    return torch.int32 if bound <= torch.iinfo(torch.int32).max else torch.int64


def _csr_parts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(row pointers, column indices, values) of ``t.reshape(t.shape[0], -1)`` if they take fewer
    bytes than ``t``; ``None`` when ``t`` is not a floating tensor of >= 2 dims or dense is smaller."""
    if t.dim() < 2 or not t.is_floating_point() or t.numel() == 0:
        return None
    m = t.reshape(t.shape[0], -1)
    rows, cols = m.shape
    nnz = int(torch.count_nonzero(m))
    crow_dtype, col_dtype = _index_dtype(nnz), _index_dtype(cols - 1, small=True)
    itemsize = {dt: torch.empty((), dtype=dt).element_size() for dt in (crow_dtype, col_dtype)}
    csr_bytes = (rows + 1) * itemsize[crow_dtype] + nnz * (itemsize[col_dtype] + t.element_size())
    if csr_bytes >= t.numel() * t.element_size():
        return None
    nz = m != 0  # NaN counts as non-zero, so it is kept
    row_idx, col_idx = nz.nonzero(as_tuple=True)
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(row_idx, minlength=rows).cumsum(0)
    return crow.to(crow_dtype), col_idx.to(col_dtype), m[nz].clone()


_INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)


def _csr_dense(key: str, shape, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The dense tensor of CSR components, after checking every invariant (a forged or corrupt
    file raises ``ModelLoadError`` instead of indexing out of bounds)."""
    if not (isinstance(shape, list) and len(shape) >= 2 and all(type(s) is int and s >= 0 for s in shape)):
        raise ModelLoadError(f"CSR tensor {key!r} has a bad shape {shape!r}")
    rows, cols = shape[0], 1
    for s in shape[1:]:
        cols *= s
    nnz = values.numel()
    if crow.dtype not in _INDEX_DTYPES or col.dtype not in _INDEX_DTYPES or not values.is_floating_point():
        raise ModelLoadError(f"CSR tensor {key!r} has index or value components of the wrong dtype")
    if crow.dim() != 1 or col.dim() != 1 or values.dim() != 1 or crow.numel() != rows + 1 or col.numel() != nnz:
        raise ModelLoadError(f"CSR tensor {key!r} has components of inconsistent sizes")
    crow, col = crow.long(), col.long()
    if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((crow[1:] < crow[:-1]).any()):
        raise ModelLoadError(f"CSR tensor {key!r} has corrupt row pointers")
    if nnz and (int(col.min()) < 0 or int(col.max()) >= cols):
        raise ModelLoadError(f"CSR tensor {key!r} has column indices out of range")
    dense = torch.zeros(rows * cols, dtype=values.dtype)
    dense[torch.repeat_interleave(torch.arange(rows), crow.diff()) * cols + col] = values
    return dense.reshape(shape)


def checksum(header: dict, tensors: dict[str, torch.Tensor]) -> str:
    """``sha256:<hex>`` of the header's format/model/metadata strings and every tensor's name, dtype,
    shape and bytes (in name order)."""
    h = hashlib.sha256()
    for field in ("format", "format_version", "model", "metadata"):
        value = str(header.get(field, ""))
        h.update(f"{field}={len(value)}:{value};".encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()


def decode_tensors(table: dict, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, info in table.items():
        if info.get("layout") == "csr":
            out[key] = _csr_dense(key, info.get("shape"), raw[f"{key}::crow"], raw[f"{key}::col"], raw[f"{key}::values"])
        else:
            out[key] = raw[key].clone()  # a fresh, aligned allocation: kernels then match the saved model bit for bit
    return out
