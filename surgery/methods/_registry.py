"""Method registry: a dict, a decorator, and get/list functions (timm's habit).

A method declares what it needs and which options it takes; ``Method.resolve`` turns what a caller
passed (Python values or CLI strings) into a complete, typed option dict, and rejects anything
unknown with the list of known options.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import MethodError

__all__ = ["Option", "Method", "NEEDS", "register_method", "get_method", "list_methods", "unknown_name"]

#: What a method can ask for: the weights alone, calibration batches, labels (or a loss) with them.
NEEDS = ("weights", "data", "labels")


@dataclass(frozen=True)
class Option:
    """One declared option of a method: a name, a type (bool, int, float, str), a default and help.

    ``choices`` restricts a str option; ``low``/``high`` bound a number (inclusive).
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None

    def parse(self, value: Any, method: str) -> Any:
        """Coerce ``value`` (a Python value or a CLI string) to the option's type and check it."""
        where = f"option {self.name!r} of method {method!r}"
        try:
            if self.type is bool:
                if isinstance(value, str):
                    low = value.strip().lower()
                    if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError(value)
                    value = low in ("1", "true", "yes", "on")
                elif not isinstance(value, (bool, int)):
                    raise ValueError(value)
                value = bool(value)
            elif self.type is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError(value)
                value = int(value)
            elif self.type is float:
                if isinstance(value, bool):
                    raise ValueError(value)
                value = float(value)
            else:
                value = self.type(value)
        except (TypeError, ValueError):
            raise MethodError(f"{where} must be a {self.type.__name__}, got {value!r}") from None
        if self.choices and value not in self.choices:
            raise MethodError(f"{where} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        if self.low is not None and value < self.low or self.high is not None and value > self.high:
            raise MethodError(f"{where} must be in [{self.low}, {self.high}], got {value!r}")
        return value


@dataclass(frozen=True)
class Method:
    """A registered method.

    ``fn(ctx, **options)`` receives a :class:`~surgery.methods.context.ScoreContext` and the resolved
    options, and returns ``{group id: scores}`` (higher = more important, kept first) or a
    :class:`~surgery.methods.context.Scores` (scores, groups left whole with a reason, folds).
    ``needs`` is a subset of :data:`NEEDS`; ``normalize`` is the global policy's default score
    normalisation for this method (``"mean"`` or ``"none"``).
    """

    name: str
    fn: Callable
    summary: str
    paper: str = ""
    needs: frozenset = frozenset({"weights"})
    options: tuple[Option, ...] = ()
    normalize: str = "mean"
    doc: str = field(default="", repr=False)

    @property
    def needs_data(self) -> bool:
        return "data" in self.needs

    @property
    def needs_labels(self) -> bool:
        return "labels" in self.needs

    def option(self, name: str) -> Option:
        for o in self.options:
            if o.name == name:
                return o
        raise MethodError(unknown_name("option", name, [o.name for o in self.options], f"method {self.name!r}"))

    def resolve(self, given: dict | None = None) -> dict:
        """Every declared option, with ``given`` values parsed and checked; unknown names raise."""
        given = dict(given or {})
        out = {}
        for o in self.options:
            out[o.name] = o.parse(given.pop(o.name), self.name) if o.name in given else o.default
        if given:
            name = sorted(given)[0]
            raise MethodError(unknown_name("option", name, [o.name for o in self.options], f"method {self.name!r}"))
        return out


def unknown_name(kind: str, name: str, known, owner: str = "") -> str:
    """``unknown option 'sed' for method 'random' (did you mean 'seed'?); known options: seed``."""
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = f" for {owner}" if owner else ""
    return f"unknown {kind} {name!r}{where}{hint}; known {kind}s: {', '.join(sorted(known)) or 'none'}"


_METHODS: dict[str, Method] = {}


def register_method(name: str, summary: str, *, paper: str = "", needs=("weights",), options=(), normalize: str = "mean"):
    """Decorator registering ``fn(ctx, **options)`` under ``name``; a duplicate name raises.

    Examples
    --------
    >>> from surgery.methods import get_method
    >>> get_method("random").resolve({"seed": "3"})
    {'seed': 3}
    >>> get_method("random").resolve({"sed": 3})
    Traceback (most recent call last):
    ...
    surgery.errors.MethodError: unknown option 'sed' for method 'random' (did you mean 'seed'?); known options: seed
    """
    needs = frozenset(needs)
    if not needs <= set(NEEDS):
        raise ValueError(f"needs must be a subset of {NEEDS}, got {sorted(needs)}")
    if normalize not in ("mean", "none"):
        raise ValueError(f"normalize must be 'mean' or 'none', got {normalize!r}")

    def deco(fn: Callable) -> Callable:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        _METHODS[name] = Method(name, fn, summary, paper, needs, tuple(options), normalize, inspect.cleandoc(fn.__doc__ or ""))
        return fn

    return deco


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise MethodError(unknown_name("method", name, _METHODS)) from None


def list_methods() -> list[str]:
    return sorted(_METHODS)
