"""Render a :class:`~surgery.dependency_graph.DependencyGraph` for ``surgery graph``.

Formats: ``text`` (a rich table of groups), ``json`` (groups + networkx node-link data), ``dot``
(pydot or pygraphviz when installed, else written directly), ``graphml`` (networkx) and ``png``
(matplotlib, when installed).
"""

from __future__ import annotations

import io
import json

import networkx as nx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import SurgeryError

__all__ = ["FORMATS", "groups_table", "coverage_text", "render_text", "groups_data", "export"]

FORMATS = ("text", "json", "dot", "graphml", "png")


def groups_table(dep, title: str = "", show_all: bool = False) -> Table:
    """A table of groups for a person: prunable groups first; one-channel groups (a stem kernel's
    height, a ``view``'s unit dims) folded into one summary line unless ``show_all``."""
    table = Table(title=escape(title) if title else None)
    for col in ("id", "size", "prunable", "reason", "label"):
        table.add_column(col, justify="right" if col in ("id", "size") else "left", overflow="fold")
    ordered = sorted(dep.groups, key=lambda g: (not g.prunable, g.id))
    folded = [g for g in ordered if g.size <= 1] if not show_all else []
    for g in ordered:
        if g in folded:
            continue
        reason = g.why if not g.prunable else (f"cross-channel: {g.cross_channel}" if g.cross_channel else "")
        table.add_row(str(g.id), str(g.size), "yes" if g.prunable else "no", escape(reason or g.reason_detail or ""), escape(g.label))
    if folded:
        table.add_row("", "1", "no", f"{len(folded)} one-channel groups (always kept; --all lists them)", "")
    return table


def coverage_text(cov) -> str:
    """``share of parameters in prunable groups`` and, by reason and op, what blocks the rest."""
    lines = [f"parameters in prunable groups: {cov.prunable_params:,} of {cov.params:,} ({100 * cov.share:.1f}%)"]
    if cov.blockers:
        lines.append("blocked (reason, op: groups, parameters):")
        lines += [f"  {b.reason}, {b.op}: {b.groups} groups, {b.params:,} params" for b in cov.blockers]
    return "\n".join(lines)


def render_text(table: Table) -> str:
    """The table as plain text (no colour), wide enough not to wrap labels."""
    buf = io.StringIO()
    Console(file=buf, width=200, color_system=None, highlight=False).print(table)
    return buf.getvalue()


def groups_data(dep) -> list[dict]:
    return [
        {"id": int(g.id), "size": int(g.size), "prunable": bool(g.prunable), "reason": g.reason.name if g.reason else None,
         "why": g.why, "cross_channel": g.cross_channel, "label": g.label, "members": [str(m) for m in g.members]}
        for g in dep.groups
    ]


def _flat_attrs(g: nx.DiGraph) -> nx.DiGraph:
    """A copy whose attribute values are scalars (graphml/dot cannot hold lists)."""
    h = nx.DiGraph()
    for n, d in g.nodes(data=True):
        h.add_node(n, **{k: (",".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in d.items()})
    h.add_edges_from(g.edges(data=True))
    return h


def _q(s) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot(g: nx.DiGraph) -> str:
    try:
        return nx.nx_pydot.to_pydot(g).to_string()
    except ImportError:
        pass
    lines = ["digraph surgery {", "  node [shape=box];"]
    for n, d in g.nodes(data=True):
        attrs = ", ".join(f"{k}={_q(v)}" for k, v in d.items())
        lines.append(f"  {_q(n)} [{attrs}];")
    for a, b, d in g.edges(data=True):
        attrs = ", ".join(f"{k}={_q(v)}" for k, v in d.items())
        lines.append(f"  {_q(a)} -> {_q(b)} [{attrs}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _png(g: nx.DiGraph) -> bytes:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SurgeryError("--format png needs matplotlib (pip install matplotlib)") from None
    fig, ax = plt.subplots(figsize=(12, max(6, len(g) / 10)))
    try:
        pos = nx.spring_layout(g, seed=0)
        colors = ["tab:red" if d.get("stop") else "tab:green" for _, d in g.nodes(data=True)]
        nx.draw_networkx(g, pos, ax=ax, node_color=colors, node_size=60, font_size=5, arrowsize=6)
        ax.axis("off")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=150, bbox_inches="tight")
        return buf.getvalue()
    finally:
        plt.close(fig)


def export(dep, format: str, source: str = "") -> str | bytes:
    """The dependency graph in ``format`` (not ``text``: see :func:`groups_table`)."""
    from .coverage import coverage

    g = dep.to_networkx()
    if format == "json":
        return json.dumps({"model": source, "coverage": coverage(dep).as_dict(), "groups": groups_data(dep),
                           "graph": nx.node_link_data(g, edges="edges")}, indent=1, default=str)
    if format == "dot":
        return _dot(_flat_attrs(g))
    if format == "graphml":
        buf = io.BytesIO()
        nx.write_graphml(_flat_attrs(g), buf)
        return buf.getvalue()
    if format == "png":
        return _png(g)
    raise SurgeryError(f"unknown graph format {format!r}; known formats: {', '.join(FORMATS)}")
