"""Methods as registered plug-ins, one file per method. Importing this package registers them."""

from . import apoz, bn_gate, entropy, from_scratch, magnitude, obd, random, taylor, thinet  # noqa: F401
from . import flap, llm_taylor, wanda  # noqa: F401  (language-model criteria)
from ._registry import NEEDS, Method, Option, get_method, list_methods, register_method
from .context import ScoreContext, Scores

__all__ = ["Method", "NEEDS", "Option", "ScoreContext", "Scores", "get_method", "list_methods", "register_method"]
