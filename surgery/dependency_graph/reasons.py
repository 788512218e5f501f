"""Why a group cannot be pruned: an enum reason plus a human message (NNCF's habit)."""

from __future__ import annotations

import enum

__all__ = ["Reason"]


class Reason(enum.Enum):
    MODEL_INPUT = "is a dimension of a model input"
    MODEL_OUTPUT = "is a dimension of a model output"
    UNSUPPORTED_OP = "reaches an op that no rule explains"
    FIXED_DIM = "is a dimension the op cannot shrink"
    NOT_PRODUCED = "is created by an op without parameters to shrink"
    SINGLE_CHANNEL = "has a single channel, which always stays"
    NOT_REWRITABLE = "cannot be rewritten consistently"

    def describe(self, detail: str = "") -> str:
        return f"{self.value}: {detail}" if detail else self.value
