"""Weights of a meta-device model read lazily from a safetensors checkpoint (``plan(..., weights=PATH)``).

An LLM is traced on the meta device so that its skeleton costs no memory; a weight-reading method
(``l1``, ``group-l2``, ``bn-gate``...) then needs the values of the parameters it scores. This module
indexes the keys of every shard once (only the headers are read), and gives each parameter's tensor
on demand with ``safe_open(...).get_tensor``: the checkpoint is memory-mapped, never loaded whole.
A small LRU cache, bounded in bytes (:data:`CACHE_BYTES`), keeps the last tensors read, since a
method may read the same weight for several members of one group; anything past the budget is
dropped, so memory stays about one tensor (plus the budget) whatever the checkpoint's size.

Parameter names map to checkpoint keys by one rule chosen for the whole model (names as they are, or
with a prefix added or stripped: a ``LlamaModel`` planned with the checkpoint of a
``LlamaForCausalLM`` has keys ``model.layers.0...``), and a parameter absent from the file is looked
up under its tied aliases (``lm_head.weight`` is stored as ``model.embed_tokens.weight`` when the
embeddings are tied).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from .errors import PlanError

__all__ = ["CACHE_BYTES", "LazyWeights"]

#: bytes of recently read tensors kept for a repeated read; a larger tensor is never kept
CACHE_BYTES = 256 << 20
_PREFIX_PROBES = 8  # unmatched parameter names used to infer a prefix rule


def _shards(path) -> list[Path]:
    """The safetensors files of ``path``: the file itself, or every ``*.safetensors`` of a directory."""
    p = Path(os.fspath(path))
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise PlanError(f"weights={str(p)!r}: no .safetensors file in this directory")
        return files
    if not p.is_file():
        raise PlanError(f"weights={str(p)!r}: no such file or directory")
    return [p]


def _aliases(*models: nn.Module) -> dict[str, tuple[str, ...]]:
    """For every parameter name, the other names of the same tensor (tied weights).

    Names sharing one ``Parameter`` object are aliases; so are the pairs a Hugging Face model
    declares tied for its config (``all_tied_weights_keys``, ``{tied: source}``, empty when
    ``tie_word_embeddings`` is off), for a meta model whose ties were not made by sharing the object.
    The class-level ``_tied_weights_keys`` is not used: it lists what *could* be tied, and an untied
    ``lm_head.weight`` missing from a checkpoint must be an error, not the embedding's values."""
    by_id: dict[int, list[str]] = {}
    pairs: list[tuple[str, str]] = []
    for model in models:
        for name, p in model.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(name)
        tied = getattr(model, "all_tied_weights_keys", None)
        if isinstance(tied, dict):
            pairs += [(a, b) for a, b in tied.items() if isinstance(a, str) and isinstance(b, str)]
    out: dict[str, set[str]] = {}
    for names in by_id.values():
        for n in names:
            out.setdefault(n, set()).update(names)
    for a, b in pairs:
        out.setdefault(a, set()).add(b)
        out.setdefault(b, set()).add(a)
    return {n: tuple(sorted(s - {n})) for n, s in out.items()}


class LazyWeights:
    """The checkpoint at ``path`` as a source of the parameters of ``model`` (traced as ``root``).

    ``get(name, like)`` returns the stored tensor (its stored dtype) for the parameter ``name`` of
    ``root`` whose meta tensor is ``like``; a missing key or a shape other than ``like``'s is a
    :class:`PlanError`. Use as a context manager,
    or call ``close()``, to release the memory maps.
    """

    def __init__(self, path, model: nn.Module, root: nn.Module):
        from safetensors import SafetensorError, safe_open

        self.path = str(os.fspath(path))
        self.model, self.root = model, root
        self.cache_bytes = CACHE_BYTES
        self._open = safe_open
        self._where: dict[str, Path] = {}
        for f in _shards(path):
            try:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        self._where.setdefault(k, f)
            except (SafetensorError, OSError) as exc:
                raise PlanError(f"weights={self.path!r}: {f.name} is not a readable safetensors file ({exc})") from None
        self._handles: dict[Path, object] = {}
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cached = 0
        self._alias = _aliases(root, model)
        self._rule = self._choose_rule()

    def __enter__(self) -> "LazyWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drop the cache and the open files."""
        self._cache.clear()
        self._cached = 0
        self._handles.clear()

    def covers(self, model: nn.Module) -> bool:
        """Whether parameter names relative to ``model`` are the names this source maps."""
        return model is self.root or model is self.model

    # -- names -> keys ---------------------------------------------------------------------------

    def _choose_rule(self) -> tuple[str, str]:
        """``(strip, add)``: a name maps to ``add + name[len(strip):]``. The rule matching the most
        parameter names (aliases included) wins; names as they are win a tie."""
        names = [n for n, _ in self.root.named_parameters(remove_duplicate=False)]
        rules = {("", "")}
        base = getattr(self.model, "base_model_prefix", "")
        if isinstance(base, str) and base:
            rules |= {("", base + "."), (base + ".", "")}
        unmatched = [n for n in names if n not in self._where][:_PREFIX_PROBES]
        for n in unmatched:
            for k in self._where:
                if k.endswith("." + n):
                    rules.add(("", k[: len(k) - len(n)]))
                elif n.endswith("." + k):
                    rules.add((n[: len(n) - len(k)], ""))

        def hits(rule) -> int:
            return sum(any(self._apply(rule, c) in self._where for c in (n, *self._alias.get(n, ()))) for n in names)

        return max(sorted(rules), key=lambda r: (hits(r), r == ("", "")))

    @staticmethod
    def _apply(rule: tuple[str, str], name: str) -> str | None:
        strip, add = rule
        if not name.startswith(strip):
            return None
        return add + name[len(strip):]

    def key(self, name: str) -> str:
        """The checkpoint key holding parameter ``name`` (its own, else a tied alias's)."""
        tried = []
        for cand in (name, *self._alias.get(name, ())):
            k = self._apply(self._rule, cand)
            if k is None:
                continue
            if k in self._where:
                return k
            tried.append(k)
        raise PlanError(f"weights={self.path!r}: no tensor for parameter {name!r} in the checkpoint "
                        f"(looked for {', '.join(map(repr, tried)) or 'nothing: no rule maps the name'})")

    # -- reading ---------------------------------------------------------------------------------

    def _handle(self, f: Path):
        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = self._open(str(f), framework="pt")
        return h

    def _read(self, key: str) -> torch.Tensor:
        """One tensor from the files (the single place a tensor's bytes are read)."""
        return self._handle(self._where[key]).get_tensor(key)

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The stored value of parameter ``name``, checked against the shape of ``like``."""
        key = self.key(name)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        shape = tuple(self._handle(self._where[key]).get_slice(key).get_shape())
        if shape != tuple(like.shape):
            raise PlanError(f"weights={self.path!r}: tensor {key!r} has shape {shape} in the checkpoint, "
                            f"but parameter {name!r} has shape {tuple(like.shape)} in the model")
        t = self._read(key)
        size = t.numel() * t.element_size()
        if size <= self.cache_bytes:
            while self._cache and self._cached + size > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= old.numel() * old.element_size()
            self._cache[key] = t
            self._cached += size
        return t
