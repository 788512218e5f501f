"""Scoring methods as registered plug-ins. Importing this package registers the built-in ones."""

from . import magnitude, random  # noqa: F401
from ._registry import Method, get_method, list_methods, register_method

__all__ = ["Method", "get_method", "list_methods", "register_method"]
