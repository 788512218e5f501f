"""Exceptions raised by surgery. Every user-facing failure is a ``SurgeryError`` with one clear line."""

from __future__ import annotations

__all__ = ["SurgeryError", "TraceError", "PlanError", "MethodError", "RewriteError", "ModelLoadError", "ExportError"]


class SurgeryError(Exception):
    """Base class: the message is a single human-readable line."""


class TraceError(SurgeryError):
    """The model could not be traced (symbolic trace or shape propagation failed)."""


class PlanError(SurgeryError):
    """A plan could not be built or does not fit the model it is applied to."""


class MethodError(SurgeryError):
    """Unknown scoring method, or a method given inputs it cannot use."""


class RewriteError(SurgeryError):
    """Applying a plan failed."""


class ModelLoadError(SurgeryError):
    """A model file or spec could not be loaded."""


class ExportError(SurgeryError):
    """A model could not be exported (ONNX or ``.pt2``)."""
