"""fx trace -> channel spaces -> couplings -> groups."""

from .graph import DependencyGraph, build_graph, trace
from .group import Group, Member
from .reasons import Reason
from .tracing import trace_module

__all__ = ["DependencyGraph", "Group", "Member", "Reason", "build_graph", "trace", "trace_module"]
