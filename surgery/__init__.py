"""surgery: structured pruning and graph surgery for PyTorch.

>>> import torch, surgery
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
>>> [m for m in surgery.methods() if m in ("l1", "thinet", "bn-gate")]
['bn-gate', 'l1', 'thinet']
"""

from .checkpoint import save
from .dependency_graph import DependencyGraph, Group, Member, Reason, trace
from .errors import SurgeryError
from .frontends import load
from .interchange import export
from .methods import list_methods as methods
from .methods import register_method
from .pipeline import plan, prune
from .plan import Plan
from .rewrite import apply
from .sensitivity import sensitivity
from .stats import ModelStats, stats
from . import train  # noqa: E402,I001  (surgery.train.fit, surgery.train.slimming)

__all__ = [
    "DependencyGraph", "Group", "Member", "ModelStats", "Plan", "Reason", "SurgeryError",
    "apply", "export", "load", "methods", "plan", "prune", "register_method", "save", "sensitivity", "stats", "trace",
]
__version__ = "0.1.0"
