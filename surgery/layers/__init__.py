"""Module types the rewrite can emit (allow-listed for checkpoints)."""

from .stripe import StripeConv

__all__ = ["StripeConv"]
