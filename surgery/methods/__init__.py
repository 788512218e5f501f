"""Methods as registered plug-ins, one file per method. Importing this package registers them."""

from . import apoz, bn_gate, entropy, from_scratch, magnitude, obd, random, taylor, thinet  # noqa: F401
from ._registry import NEEDS, Method, Option, get_method, list_methods, register_method
from .context import ScoreContext, Scores

__all__ = ["Method", "NEEDS", "Option", "ScoreContext", "Scores", "get_method", "list_methods", "register_method"]
