"""Module types the rewrite can emit (allow-listed for checkpoints)."""

from .affine import Affine
from .stripe import StripeConv

__all__ = ["Affine", "StripeConv"]
