"""Input checks of a ``torch.export`` graph, as graph nodes.

``torch.export`` records what a graph assumes about its inputs as *guards*: static dims, dims that
must be equal, and Python expressions over input sizes (``L['x'].size()[3] > 4``). Its own
``ExportedProgram.module()`` checks them with generated Python code (a ``_guards_fn`` module or a
forward pre-hook), which neither pickles nor stores as data. Here every accepted guard becomes
``torch._assert`` over ``aten.sym_size.int`` and ``operator`` nodes, so the checks travel with the
graph (``torch.save``, the dense checkpoint) and the dependency graph sees plain size arithmetic.

:func:`input_checks` decides which guards a dynamic graph may carry:

* a dim fixed to a constant, two dims with the same symbol (the structure of the inputs);
* a dim's range (``x.shape[3] >= 5`` after ``if x.shape[-1] > 4``) and any inequality over sizes
  (``(1 + (W - 1) // 2) != 1``: export's 0/1 specialisation of the width after a strided conv;
  ``W' < W' * H'`` from a contiguity test): the sizes keep a region of full dimension;
* an equation over one size (``(W + 1) // 2 == 4``).

Each is checked in the graph, and the example itself must pass it. An equation over several sizes
(``6 * H * W == 384``, a flatten into a linear layer) confines them to a relation: the model
specialises them, and the try is rejected with the guard as the reason.

Guards are read with :mod:`ast` and a closed grammar (ints, ``+ - * // %``, unary minus,
``L['name'][key]....size()[d]``); nothing is evaluated by Python.
"""

from __future__ import annotations

import ast
import operator

import torch
import torch.fx

__all__ = ["input_checks", "insert_checks"]

aten = torch.ops.aten
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod}
_SYM_CALLS = {"sym_max": torch.sym_max, "sym_min": torch.sym_min}


def _ref(node) -> str | None:
    """``L['x'][0]['k']`` -> ``"x[0]['k']"`` (the input's name plus its pytree key path)."""
    keys = []
    while isinstance(node, ast.Subscript):
        if not isinstance(node.slice, ast.Constant) or type(node.slice.value) not in (int, str):
            return None
        keys.append(node.slice.value)
        node = node.value
    if not (isinstance(node, ast.Name) and node.id == "L") or not keys or not isinstance(keys[-1], str):
        return None
    keys.reverse()
    return keys[0] + "".join(f"[{k!r}]" for k in keys[1:])


def _expr(node, names: dict[str, int]):
    """A size expression as a tree: ``("const", n)``, ``("size", input, dim)``, ``("neg", a)``,
    ``("bin", op, a, b)`` (``+ - * // %``, ``torch.sym_max`` / ``sym_min``); ``None`` outside the grammar."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return ("const", node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        a = _expr(node.operand, names)
        return None if a is None else ("const", -a[1]) if a[0] == "const" else ("neg", a)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _expr(node.left, names), _expr(node.right, names)
        return ("bin", _BINOPS[type(node.op)], a, b) if a and b else None
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _SYM_CALLS
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch" and len(node.args) == 2
            and not node.keywords):
        a, b = _expr(node.args[0], names), _expr(node.args[1], names)
        return ("bin", _SYM_CALLS[node.func.attr], a, b) if a and b else None
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and type(node.slice.value) is int:
        call = node.value
        if (isinstance(call, ast.Call) and not call.args and not call.keywords
                and isinstance(call.func, ast.Attribute) and call.func.attr == "size"):
            ref = _ref(call.func.value)
            if ref in names:
                return ("size", names[ref], node.slice.value)
    return None


def _evaluate(tree, sizes) -> int:
    kind = tree[0]
    if kind == "const":
        return tree[1]
    if kind == "size":
        return sizes(tree[1], tree[2])
    if kind == "neg":
        return -_evaluate(tree[1], sizes)
    return tree[1](_evaluate(tree[2], sizes), _evaluate(tree[3], sizes))


def _traced(val: torch.Tensor, d: int):
    """A traced dim as an int (static) or its sympy symbol/expression."""
    if d >= val.dim():
        return None
    s = val.shape[d]
    expr = s.node.expr if isinstance(s, torch.SymInt) else None
    return int(s) if expr is None or expr.is_number else expr


def input_checks(program, placeholders: list, leaves: list, example: list, names: dict[str, int], static: bool):
    """``(checks, None)``, or ``(None, why)`` when the graph is not as dynamic as asked.

    ``leaves`` are the traced example's flat inputs, ``example`` the user's (a batch of 1 is traced
    as 2), ``names`` maps ``"x"`` / ``"extra[0]"`` to a flat input's index. A check is
    ``("value", i, v)``, ``("dim", i, d, size)``, ``("same", i, d, j, e)`` or
    ``("guard", op, a, b, text)`` (``op(a, b)`` over size expression trees).
    """
    if len(placeholders) != len(leaves):
        return None, "export's inputs do not match the example's"
    checks, first = [], {}
    for i, (ph, leaf) in enumerate(zip(placeholders, leaves)):
        if not isinstance(leaf, torch.Tensor):
            if isinstance(leaf, (bool, int, float)) and leaf == leaf:  # export bakes scalars in
                checks.append(("value", i, leaf))
            continue
        val = ph.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None, f"no shape recorded for input {ph.name}"
        for d in range(val.dim()):
            traced = int(leaf.shape[d]) if static else _traced(val, d)
            if isinstance(traced, int):
                checks.append(("dim", i, d, traced))
                continue
            if not getattr(traced, "is_Symbol", False):
                return None, f"{ph.name}.shape[{d}] is traced as {traced}"
            if traced in first:
                checks.append(("same", i, d, *first[traced]))
                continue
            first[traced] = (i, d)
            vr = program.range_constraints.get(traced)
            size = ("size", i, d)
            if vr is not None and int(vr.lower) > 2:  # like export, a dynamic dim may be 0 or 1 otherwise
                checks.append(("guard", operator.ge, size, ("const", int(vr.lower)), f"{ph.name}.shape[{d}] >= {vr.lower}"))
            if vr is not None and str(vr.upper) not in ("int_oo", "oo"):
                checks.append(("guard", operator.le, size, ("const", int(vr.upper)), f"{ph.name}.shape[{d}] <= {vr.upper}"))
    if static:
        return checks, None
    guards = getattr(program, "_guards_code", None)
    if guards is None:
        return None, "this torch does not report export's guards"
    for g in guards:
        check = _guard(g, placeholders, names)
        if check is None:
            return None, f"the model needs `{g}`"
        if check != ():
            checks.append(check)
    sizes = lambda i, d: int(example[i].shape[d])  # noqa: E731
    for check in checks:
        if check[0] == "guard" and not _holds(check, sizes):
            return None, f"the example does not pass `{check[4]}`"
    return checks, None


_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}


def _dims(tree) -> set:
    if tree[0] == "size":
        return {tree[1:]}
    return set().union(*(_dims(t) for t in tree[1:] if isinstance(t, tuple)))


def _holds(check, sizes) -> bool:
    try:
        return bool(check[1](_evaluate(check[2], sizes), _evaluate(check[3], sizes)))
    except (ZeroDivisionError, IndexError, AttributeError):
        return False


def _guard(text: str, placeholders: list, names: dict[str, int]):
    """``()`` for a guard the structural checks cover, a ``("guard", ...)`` check, or None: an
    equation over several sizes (``6*H*W == 384``) means the model specialises them."""
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(node, ast.Compare) or len(node.ops) != 1 or type(node.ops[0]) not in _COMPARE:
        return None
    a, b = _expr(node.left, names), _expr(node.comparators[0], names)
    if a is None or b is None:
        return None

    def traced(t):
        val = placeholders[t[1]].meta.get("val")
        return _traced(val, t[2]) if t[0] == "size" and isinstance(val, torch.Tensor) else None

    op = type(node.ops[0])
    if op is ast.Eq and a[0] == "size" and b[0] == "const" and traced(a) == b[1]:
        return ()  # a dim fixed to a constant: a "dim" check
    if op is ast.Eq and a[0] == b[0] == "size" and traced(a) is not None and traced(a) == traced(b):
        return ()  # two dims with one symbol: a "same" check
    if op is ast.Eq and len(_dims(a) | _dims(b)) > 1:
        return None
    return ("guard", _COMPARE[op], a, b, text.replace("L['", "").replace("'].size()", ".size()"))


def insert_checks(graph: torch.fx.Graph, checks: list) -> None:
    """``torch._assert`` nodes for ``checks`` right after the placeholders."""
    placeholders = graph.find_nodes(op="placeholder")
    if not placeholders or not checks:
        return
    sizes: dict[tuple[int, int], torch.fx.Node] = {}

    def size(i: int, d: int) -> torch.fx.Node:
        if (i, d) not in sizes:
            sizes[(i, d)] = graph.call_function(aten.sym_size.int, (placeholders[i], d))
        return sizes[(i, d)]

    def emit(tree):
        if tree[0] == "const":
            return tree[1]
        if tree[0] == "size":
            return size(tree[1], tree[2])
        if tree[0] == "neg":
            return graph.call_function(operator.neg, (emit(tree[1]),))
        return graph.call_function(tree[1], (emit(tree[2]), emit(tree[3])))

    with graph.inserting_before(placeholders[-1].next):
        for check in checks:
            kind, name = check[0], placeholders[check[1]].name if check[0] != "guard" else ""
            if kind == "value":
                ok, msg = graph.call_function(operator.eq, (placeholders[check[1]], check[2])), f"{name} must be {check[2]!r}"
            elif kind == "dim":
                ok, msg = graph.call_function(operator.eq, (size(check[1], check[2]), check[3])), f"{name}.shape[{check[2]}] must be {check[3]}"
            elif kind == "same":
                i, d, j, e = check[1:]
                ok = graph.call_function(operator.eq, (size(i, d), size(j, e)))
                msg = f"{name}.shape[{d}] must equal {placeholders[j].name}.shape[{e}]"
            else:
                ok, msg = graph.call_function(check[1], (emit(check[2]), emit(check[3]))), f"the sizes must satisfy {check[4]}"
            graph.call_function(torch._assert, (ok, f"{msg} (the graph torch.export traced)"))
