"""surgery graph / stats / methods: look at a model and at the registry."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .. import _graph_export as graph_export
from .. import checkpoint
from .._files import atomic_write
from ..errors import SurgeryError
from ._common import (
    Debug, InputShape, Kwargs, Leaf, ModelArg, Trust, Weights, _check_output, _fmt, _load, _out, _run, app,
)


# -- graph --------------------------------------------------------------------------------------
@app.command()
def graph(
    model: ModelArg,
    format: Annotated[str, typer.Option("--format", "-f", help="text, json, dot, graphml or png.")] = "text",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write here instead of stdout.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="List one-channel groups too instead of one summary line.")] = False,
    input_shape: InputShape = None, trust: Trust = False, weights: Weights = None, kwargs: Kwargs = None, leaf: Leaf = None, debug: Debug = False,
) -> None:
    """Show the channel groups of MODEL and what blocks pruning, or export its dependency graph."""

    def work():
        import surgery

        if format not in graph_export.FORMATS:
            raise SurgeryError(f"unknown graph format {format!r}; known formats: {', '.join(graph_export.FORMATS)}")
        if format == "png" and out is None:
            raise SurgeryError("--format png needs --out FILE")
        _check_output(out, model, "output")
        net, x, source = _load(model, trust, weights, input_shape, kwargs)
        dep = surgery.trace(net, x, tuple(leaf or ()))
        if format == "text":
            from surgery.coverage import coverage

            table = graph_export.groups_table(dep, f"{source}: {len(dep.groups)} groups, "
                                                   f"{sum(g.prunable for g in dep.groups)} prunable", show_all=all_)
            summary = graph_export.coverage_text(coverage(dep))
            if out is None:
                _out.print(table)
                _out.print(escape(summary))
            else:
                atomic_write(out, graph_export.render_text(table) + summary + "\n")
            return
        data = graph_export.export(dep, format, source)
        if out is None:
            print(data if isinstance(data, str) else data.decode())
        else:
            atomic_write(out, data)

    _run(debug, work)


# -- stats --------------------------------------------------------------------------------------
@app.command()
def stats(
    model: ModelArg,
    latency: Annotated[bool, typer.Option("--latency", help="Also time a forward pass on CPU.")] = False,
    input_shape: InputShape = None, trust: Trust = False, weights: Weights = None, kwargs: Kwargs = None, debug: Debug = False,
) -> None:
    """Parameters, MACs and share of zero weights of MODEL, its file size, and latency with --latency."""

    def work():
        from surgery.stats import stats as model_stats
        from surgery.stats import weight_sparsity

        net, x, source = _load(model, trust, weights, input_shape, kwargs)
        s = model_stats(net, x, latency=latency)
        table = Table(title=f"{escape(source)} at input {tuple(x.shape)}")
        table.add_column("")
        table.add_column("value", justify="right")
        for label, n in (("params", s.params), ("MACs", s.macs)):
            table.add_row(label, f"{n:,}" + (f" ({_fmt(n)})" if n >= 1000 else ""))
        sp = weight_sparsity(net)
        table.add_row("zero weights", f"{sp.overall:.2%} of all parameters, {sp.of_prunable:.2%} of Linear/conv weights")
        if os.path.isfile(model):
            table.add_row("file size", f"{os.path.getsize(model):,} B ({_fmt(os.path.getsize(model))}B)")
        if s.latency_ms is not None:
            table.add_row("latency", f"{s.latency_ms:.2f} ms")
        meta = checkpoint.metadata_of(net)
        if isinstance(meta, dict) and meta.get("method"):
            table.add_row("pruned", escape(f"{meta.get('method')} ratio {meta.get('ratio')} from {meta.get('source')}"))
        _out.print(table)

    _run(debug, work)


# -- methods ------------------------------------------------------------------------------------
@app.command()
def methods(
    name: Annotated[Optional[str], typer.Argument(help="Show one method's paper, needs and options.")] = None,
    debug: Debug = False,
) -> None:
    """List the registered methods, or describe one."""

    def work():
        from surgery.methods import get_method, list_methods

        if name is not None:
            m = get_method(name)
            _out.print(f"[bold]{escape(m.name)}[/bold]: {escape(m.summary)}")
            if m.paper:
                _out.print(f"paper: {escape(m.paper)}")
            _out.print(f"needs: {', '.join(n for n in ('weights', 'data', 'labels') if n in m.needs) or 'nothing'}")
            _out.print(f"global ranking normalisation: {m.normalize}")
            if m.doc:
                _out.print(escape(m.doc))
            table = Table(title=f"options of {escape(m.name)} (--option NAME=VALUE)")
            for col in ("option", "type", "default", "meaning"):
                table.add_column(col)
            for o in m.options:
                choices = f" ({' | '.join(map(str, o.choices))})" if o.choices else ""
                table.add_row(o.name, o.type.__name__, repr(o.default), escape(o.help + choices))
            if m.options:
                _out.print(table)
            else:
                _out.print("no options")
            return
        names = list_methods()
        width = max((len(n) for n in names), default=0)
        for n in names:
            m = get_method(n)
            extra = " (needs --data with labels)" if m.needs_labels else " (needs --data)" if m.needs_data else ""
            _out.print(f"{escape(n.ljust(width))}  {escape(m.summary)}{extra}")

    _run(debug, work)
