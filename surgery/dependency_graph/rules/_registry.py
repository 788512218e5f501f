"""The one registry of op rules, keyed by module type, function object or tensor-method name.

A rule has up to three parts:

* ``couple(ctx)``: adds couplings/stops between the spaces of the node's inputs, outputs and (for
  modules) parameters. Spaces of the node that the rule leaves untouched are stopped afterwards, so a
  rule that forgets a dimension makes pruning less aggressive, never wrong.
* ``rewrite(ctx)``: after pruning, fixes constants in the node's arguments (reshape sizes, split
  sizes, normalized shapes, ...).
* ``fix(module, ctx)``: after a module's parameters were sliced, updates its size attributes
  (``in_channels``, ``num_features``, ...).

An op with no rule stops every space it touches (reason ``UNSUPPORTED_OP``), and so does an op whose
rule raises while coupling it (the reason's detail names the node and the error); the trace goes on.
Rules read their arguments through ``ctx.arg(index, name, default)``, normalised once for all rules in
``arguments.py`` (positional or keyword, non-negative dims).

A module rule also declares leafness: fx calls a module with a rule as one node (``call_module``) and
enters every other module (``tracing.py``). A rule is written for its class's ``forward``; a subclass
that brings its own ``forward`` (a ``Conv2d`` that standardises its weight first) gets the rule only
when that ``forward`` is torch's own (``LSTM`` under the ``RNNBase`` rule). A module with
parametrizations is entered, so its ``parametrizations.<name>`` call shows how the tensor is made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.fx
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "OpRule", "module_rule", "function_rule", "method_rule", "named_op_rule", "lookup", "module_rule_for", "is_leaf", "aten_ops",
]


@dataclass(frozen=True)
class OpRule:
    name: str
    couple: Callable
    rewrite: Callable | None = None
    fix: Callable | None = None
    #: renamed parameters, ``(("indices", "input"),)``: the rule reads them under the new name
    aliases: tuple[tuple[str, str], ...] = ()


_MODULES: dict[type, OpRule] = {}
_FUNCTIONS: dict[object, OpRule] = {}
_METHODS: dict[str, OpRule] = {}
_NAMED_OPS: dict[str, OpRule] = {}


def _register(table: dict, keys, rule: OpRule) -> None:
    for key in keys:
        if key in table:
            raise ValueError(f"an op rule for {key!r} is already registered ({table[key].name})")
        table[key] = rule


def module_rule(*types: type[nn.Module], rewrite=None, fix=None):
    """Register ``couple`` for module types (subclasses match through the MRO, see ``module_rule_for``);
    modules of these types become fx leaves."""

    def deco(couple):
        _register(_MODULES, types, OpRule(couple.__name__, couple, rewrite, fix))
        return couple

    return deco


def function_rule(*functions, rewrite=None, aliases: dict[str, str] | None = None):
    """Register ``couple`` for ``call_function`` targets (the function objects themselves).

    ``aliases`` renames parameters of these functions to the names the rule reads (``aten.embedding``
    takes ``(weight, indices)`` where ``F.embedding`` takes ``(input, weight)``).
    """

    def deco(couple):
        _register(_FUNCTIONS, functions, OpRule(couple.__name__, couple, rewrite, aliases=tuple((aliases or {}).items())))
        return couple

    return deco


def method_rule(*names: str, rewrite=None):
    """Register ``couple`` for ``call_method`` targets (tensor method names)."""

    def deco(couple):
        _register(_METHODS, names, OpRule(couple.__name__, couple, rewrite))
        return couple

    return deco


def named_op_rule(*names: str, rewrite=None):
    """Register ``couple`` for custom operators by qualified name (``"transformers::grouped_mm_fallback"``,
    an overload's ``OpOverload.name()``): such an op exists only once its library is imported, and
    surgery imports no model library itself, so the rule cannot be keyed by the op object."""

    def deco(couple):
        _register(_NAMED_OPS, names, OpRule(couple.__name__, couple, rewrite))
        return couple

    return deco


def _forward_owner(mro: tuple[type, ...]) -> type | None:
    return next((c for c in mro if "forward" in c.__dict__), None)


def module_rule_for(module: nn.Module) -> OpRule | None:
    """The rule registered for the module's class or its nearest base, or None.

    A base's rule describes the base's ``forward``: a subclass that defines its own ``forward``
    outside torch (user code, timm's ``StdConv2d``) has no rule, so fx enters it.
    """
    mro = type(module).__mro__
    for i, cls in enumerate(mro):
        rule = _MODULES.get(cls)
        if rule is None:
            continue
        owner = _forward_owner(mro)
        if owner is None or mro.index(owner) >= i or owner.__module__.split(".")[0] == "torch":
            return rule
        return None
    return None


def is_leaf(module: nn.Module) -> bool:
    """Whether fx should call ``module`` as one node: it has a rule and no parametrization."""
    if parametrize.is_parametrized(module):
        return False
    return module_rule_for(module) is not None


def lookup(node: torch.fx.Node, module: nn.Module | None = None) -> OpRule | None:
    """The rule for a node, or None when the op is unknown."""
    if node.op == "call_module":  # a parametrized module listed as a leaf: its tensors are computed, no rule fits
        return None if parametrize.is_parametrized(module) else module_rule_for(module)
    if node.op == "call_function":
        try:
            rule = _FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            return None
        if rule is None and isinstance(node.target, torch._ops.OpOverload):
            rule = _NAMED_OPS.get(node.target.name())
        return rule
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def aten_ops(*names: str) -> list:
    """aten overloads (``"add.Tensor"``; a bare name is its ``default``) that exist in this torch
    build, for the export front end's aliases of a rule; missing names are skipped."""
    out = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(torch.ops.aten, packet, None), overload or "default", None)
        if op is not None:
            out.append(op)
    return out
