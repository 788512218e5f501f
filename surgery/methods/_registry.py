"""Scoring-method registry: a dict, a decorator, and get/list functions (timm's habit)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import MethodError

__all__ = ["Method", "register_method", "get_method", "list_methods"]


@dataclass(frozen=True)
class Method:
    """A registered scoring method.

    ``score(model, graph, groups, data, **options) -> {group id: 1-D numpy array of scores}``; a higher
    score means more important (kept first). ``needs_data`` methods receive calibration batches.
    """

    name: str
    score: Callable
    summary: str
    needs_data: bool = False


_METHODS: dict[str, Method] = {}


def register_method(name: str, summary: str, needs_data: bool = False):
    """Decorator registering ``score`` under ``name``; a duplicate name raises."""

    def deco(fn: Callable) -> Callable:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        _METHODS[name] = Method(name, fn, summary, needs_data)
        return fn

    return deco


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        known = ", ".join(sorted(_METHODS))
        raise MethodError(f"unknown method {name!r}; known methods: {known}") from None


def list_methods() -> list[str]:
    return sorted(_METHODS)
