"""surgery: structured pruning and graph surgery for PyTorch."""

from .dependency_graph import DependencyGraph, Group, Member, Reason, trace
from .errors import SurgeryError

__all__ = ["DependencyGraph", "Group", "Member", "Reason", "SurgeryError", "trace"]
__version__ = "0.1.0"
