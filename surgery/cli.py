"""The ``surgery`` command line: parse, call one API function, print with rich.

    surgery prune MODEL --method l1 --ratio 0.5 [--global] [--layer-ratio NAME=R ...] [--out F]
                  [--data D] [--target-macs 0.5] [--round-to 8] [--option NAME=VALUE ...]
                  [--format dense|csr] [--plan-out plan.json] [--plan plan.json]
    surgery sensitivity MODEL --data D [--ratios 0.1,0.3,0.5,0.7] [--method l1] [--out sens.png]
                  [--csv F] [--emit-layer-ratios F] [--max-drop 0.01] [--max-error 0.05]
    surgery graph MODEL [--format text|json|dot|graphml|png] [--out F]
    surgery stats MODEL [--latency]
    surgery methods [NAME]

Every command takes ``--input-shape 1,3,224,224``, ``--trust``, ``--weights F``, ``--leaf NAME``
(where it loads a model) and ``--debug``. Errors print one red line on stderr and exit 1 (usage
errors exit 2); ``--debug`` shows the traceback. Output files are written atomically, after all the
work succeeded, and never over the input model.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import torch
import torch.fx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import _graph_export as graph_export
from . import checkpoint
from .errors import SurgeryError
from .io import load_model, parse_input_shape

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Structured pruning for PyTorch: trace, group coupled channels, prune, save.",
)
_out = Console(width=None if Console().is_terminal else 200, highlight=False)
_err = Console(stderr=True, highlight=False, soft_wrap=True)

# -- shared options -----------------------------------------------------------------------------
ModelArg = Annotated[str, typer.Argument(help="A model file (.pt/.pth pickle, .pt2, surgery checkpoint) or a spec: "
                                              "torchvision:NAME, timm:NAME, package.module:factory.")]
InputShape = Annotated[Optional[str], typer.Option("--input-shape", help="Example input shape, e.g. 1,3,224,224.")]
Trust = Annotated[bool, typer.Option("--trust", help="Fully unpickle MODEL (runs code from the file: trusted files only).")]
Weights = Annotated[Optional[Path], typer.Option("--weights", help="A state_dict file loaded into MODEL.")]
Kwargs = Annotated[Optional[str], typer.Option("--kwargs", help="JSON keyword arguments for a spec's builder, e.g. '{\"num_classes\": 10}'.")]
Leaf = Annotated[Optional[list[str]], typer.Option("--leaf", help="Qualified name of a module fx must not enter (repeatable).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks and warnings.")]


def _fail_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if isinstance(exc, SurgeryError):
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _run(debug: bool, work: Callable[[], None]) -> None:
    """Run ``work``; any failure becomes one red line on stderr and exit code 1.

    Without ``--debug``, what libraries write to stderr meanwhile (warnings, torch logs, partial
    graphs printed by ``torch.export``) is held back, so the error line is the only one; with
    ``--debug`` everything shows, including the traceback.
    """
    if debug:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            work()
        return
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            work()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        _err.print("[red]error:[/red] interrupted")
        raise typer.Exit(130) from None
    except BrokenPipeError:  # `surgery graph ... | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        raise typer.Exit(141) from None
    except Exception as exc:
        _err.print(f"[red]error:[/red] {escape(_fail_line(exc))}")
        raise typer.Exit(1) from None
    finally:
        logging.disable(logging.NOTSET)


@contextlib.contextmanager
def _progress():
    """A transient rich progress display on stdout; ``step(text)`` shows the current stage or
    calibration batch (silent when piped). The stage count is not known ahead (methods report
    batches), so the bar pulses with the elapsed time beside it."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=_out, transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def step(text: str) -> None:
            bar.update(task, description=escape(text))

        yield step


def _check_output(path: Path | None, model: str, what: str = "output") -> None:
    """Fail before any work if ``path`` cannot be written or is the input model."""
    if path is None:
        return
    folder = path.absolute().parent
    if not folder.is_dir():
        raise SurgeryError(f"cannot write {what} {path}: directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SurgeryError(f"cannot write {what} {path}: directory {folder} is not writable")
    if path.is_dir():
        raise SurgeryError(f"cannot write {what} {path}: it is a directory")
    if os.path.exists(model) and path.exists() and os.path.samefile(model, path):
        raise SurgeryError(f"refusing to overwrite the input model {model} with the {what}")


def _builder_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SurgeryError(f"--kwargs is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise SurgeryError(f"--kwargs must be a JSON object, got {type(value).__name__}")
    return value


def _load(model: str, trust: bool, weights: Path | None, input_shape: str | None, kwargs: str | None = None):
    shape = parse_input_shape(input_shape) if input_shape else None
    module, known, source = load_model(model, trust=trust, weights=weights, kwargs=_builder_kwargs(kwargs))
    shape = shape or known
    if shape is None:
        raise SurgeryError(f"the input shape of {source} is unknown; pass --input-shape (e.g. 1,3,224,224)")
    module.eval()
    return module, torch.randn(shape), source


def _fmt(n: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return str(int(n))


def _layer_ratio_file(path: str) -> dict[str, float]:
    """``--layer-ratio @FILE``: one ``PATTERN=RATIO`` a line; blank lines and ``#`` comments ignored."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SurgeryError(f"cannot read layer ratios {path}: {getattr(exc, 'strerror', None) or exc}") from None
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        try:
            r = float(value)
        except ValueError:
            r = None
        if not sep or not name.strip() or r is None or not 0.0 <= r < 1.0:
            raise SurgeryError(f"{path}:{n}: expected PATTERN=RATIO with a ratio in [0, 1) (e.g. 'layer1.*=0.3'), "
                               f"got {line!r}")
        out[name.strip()] = r
    return out


def _layer_ratios(items: list[str] | None) -> dict[str, float]:
    out = {}
    for item in items or ():
        if item.startswith("@"):
            out.update(_layer_ratio_file(item[1:]))
            continue
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise SurgeryError(f"--layer-ratio takes NAME=RATIO (e.g. 'layer1.*=0.3'), got {item!r}")
    return out


# -- prune ----------------------------------------------------------------------------------------
Data = Annotated[Optional[str], typer.Option("--data", "-d", help="Calibration data: digits, an image folder, or an .npz/.pt file with x (and y).")]
CalibBatches = Annotated[Optional[int], typer.Option("--calib-batches", help="Use at most N calibration batches.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Batch size for --data.")]
MethodOpt = Annotated[Optional[list[str]], typer.Option("--option", "-O", help="A method option NAME=VALUE (repeatable; see `surgery methods NAME`).")]


def _method_options(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise SurgeryError(f"--option takes NAME=VALUE (e.g. 'seed=3'), got {item!r}")
        out[name.strip()] = value.strip()
    return out


def _calibration(data: str | None, x: torch.Tensor, batch_size: int, calib_batches: int | None):
    if data is None:
        return None
    from surgery.calibration import Calibration, load_data

    xs, ys = load_data(data, tuple(x.shape))
    if calib_batches is not None and calib_batches < 1:
        raise SurgeryError(f"--calib-batches must be a positive integer, got {calib_batches}")
    return Calibration(xs if ys is None else (xs, ys), batch_size=batch_size)


@app.command()
def prune(
    model: ModelArg,
    method: Annotated[str, typer.Option("--method", "-m", help="Scoring method (see `surgery methods`).")] = "l1",
    ratio: Annotated[float, typer.Option("--ratio", "-r", help="Fraction of channels removed per group, in [0, 1).")] = 0.5,
    global_: Annotated[bool, typer.Option("--global", help="Rank channels across all groups.")] = False,
    layer_ratio: Annotated[Optional[list[str]], typer.Option("--layer-ratio", help="NAME=R ratio for modules matching a pattern (repeatable); @FILE reads NAME=R lines.")] = None,
    target_macs: Annotated[Optional[float], typer.Option("--target-macs", help="Keep this fraction of the MACs (bisection over the global ranking).")] = None,
    round_to: Annotated[int, typer.Option("--round-to", help="Keep a multiple of N channels in every group of at least N.")] = 1,
    option: MethodOpt = None, data: Data = None, calib_batches: CalibBatches = None, batch_size: BatchSize = 32,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the pruned model here.")] = None,
    format: Annotated[str, typer.Option("--format", help="Checkpoint format: dense or csr.")] = "dense",
    plan_out: Annotated[Optional[Path], typer.Option("--plan-out", help="Write the plan (JSON) here.")] = None,
    plan_in: Annotated[Optional[Path], typer.Option("--plan", help="Apply this plan (JSON) instead of making one.")] = None,
    output: Annotated[str, typer.Option("--output", help="auto (the model's own class where its forward allows), module, or graph.")] = "auto",
    submodule: Annotated[Optional[str], typer.Option("--submodule", help="Prune only this submodule (e.g. backbone); the whole model is returned.")] = None,
    free_output: Annotated[Optional[list[str]], typer.Option("--free-output", help="Model outputs (module-name patterns) whose channels may shrink (repeatable).")] = None,
    input_shape: InputShape = None, trust: Trust = False, weights: Weights = None, kwargs: Kwargs = None, leaf: Leaf = None, debug: Debug = False,
) -> None:
    """Prune MODEL and print a before/after table; --out writes a dense checkpoint."""

    def work():
        from surgery.pipeline import run
        from surgery.plan import Plan
        from surgery.planner import split_options

        options = {}
        if plan_in is None:
            options = dict(_method_options(option), leaf_modules=tuple(leaf or ()), round_to=round_to,
                           layer_ratios=_layer_ratios(layer_ratio))
            if global_:
                options["policy"] = "global"
            if target_macs is not None:
                options["target_macs"] = target_macs
            if calib_batches is not None:
                options["calib_batches"] = calib_batches
            if submodule:
                options["submodule"] = submodule
            if free_output:
                options["free_outputs"] = tuple(free_output)
            from surgery.plan import check_ratio

            check_ratio(ratio)
            split_options(method, options)
        if format not in checkpoint.FORMATS:
            raise SurgeryError(f"unknown checkpoint format {format!r}; known formats: {', '.join(checkpoint.FORMATS)}")
        _check_output(out, model, "output")
        _check_output(plan_out, model, "plan")
        saved = None
        if plan_in is not None:
            try:
                saved = Plan.from_json(plan_in.read_text())
            except OSError as exc:
                raise SurgeryError(f"cannot read plan {plan_in}: {exc.strerror or exc}") from None
        with _progress() as step:
            step(f"loading {model}")
            net, x, source = _load(model, trust, weights, input_shape, kwargs)
            calib = _calibration(data, x, batch_size, calib_batches)
            result = run(net, saved.example_inputs() if saved else x, method, ratio, calib, plan=saved, measure=True,
                         output=output, progress=step, **options)
            p, pruned, before, after = result.plan, result.model, result.before, result.after
            meta = {"source": source, "method": p.method, "ratio": p.ratio, "policy": p.policy, "plan": p.to_dict(),
                    "input_shape": list(p.input_shapes[0]) if p.input_shapes else list(x.shape),
                    "stats": {"before": before.as_dict(), "after": after.as_dict()}}
            existed = out is not None and out.exists()
            step(f"writing {out}" if out is not None else "done")
            if out is not None:
                _save_result(pruned, out, format, meta, p.example_inputs())
        if plan_out is not None:
            try:
                checkpoint.atomic_write(plan_out, p.to_json(indent=1))
            except BaseException:
                if out is not None and not existed:
                    out.unlink(missing_ok=True)  # all outputs or none
                raise
        _print_prune(source, p, before, after, out, plan_out)
        why = getattr(pruned, "meta", {}).get("surgery_output", {}).get("reason") if isinstance(pruned, torch.fx.GraphModule) else None
        _out.print(f"result: a GraphModule ({escape(why)})" if why else f"result: {escape(type(pruned).__name__)}")

    _run(debug, work)


def _save_result(model, out: Path, format: str, meta: dict, example_inputs) -> None:
    """A surgery checkpoint; a model that cannot be traced as a whole (a detector around a pruned
    backbone) is written as a whole-module pickle instead, which ``surgery`` loads back through its
    allow-list (its classes come from torch / torchvision)."""
    from surgery.errors import TraceError

    try:
        checkpoint.save(model, out, format=format, metadata=meta, example_inputs=example_inputs)
    except TraceError:
        if isinstance(model, torch.fx.GraphModule) or format != "dense":
            raise
        checkpoint.atomic_write(out, lambda tmp: torch.save(model, tmp))
        _out.print("the whole model cannot be traced: written as a whole-module pickle (torch.save)")


def _print_prune(source, p, before, after, out, plan_out) -> None:
    table = Table(title=f"{escape(source)}: {p.method}, ratio {p.ratio:g}, {p.policy}")
    for col in ("", "before", "after", "kept"):
        table.add_column(col, justify="right" if col else "left")
    for name, a, b in (("params", before.params, after.params), ("MACs", before.macs, after.macs)):
        table.add_row(name, _fmt(a), _fmt(b), f"{100 * b / a:.1f}%" if a else "-")
    _out.print(table)
    groups = Table(title=f"{len(p.groups)} of {p.n_groups} groups pruned")
    for col in ("group", "label", "channels", "kept"):
        groups.add_column(col, justify="left" if col == "label" else "right")
    for g in p.groups:
        groups.add_row(str(g.id), escape(g.label), str(g.size), str(len(g.keep)))
    _out.print(groups)
    if p.notes:
        first = next(iter(p.notes.values()))
        _out.print(f"{len(p.notes)} prunable group(s) left whole by {escape(p.method)}, e.g.: {escape(first)}")
    if plan_out is not None:
        _out.print(f"plan written to {escape(str(plan_out))}")
    _out.print(f"pruned model written to {escape(str(out))}" if out is not None else "no --out given: nothing written")


# -- sensitivity ----------------------------------------------------------------------------------
def _ratio_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise SurgeryError(f"--ratios takes numbers in [0, 1) separated by commas (e.g. 0.1,0.3,0.5), got {text!r}")
    for v in values:
        if not 0.0 <= v < 1.0:
            raise SurgeryError(f"--ratios: every ratio must be in [0, 1), got {v:g}")
    return values


@app.command()
def sensitivity(
    model: ModelArg,
    data: Data = None,
    ratios: Annotated[str, typer.Option("--ratios", help="Ratios tried on each group alone, comma-separated.")] = "0.1,0.3,0.5,0.7",
    method: Annotated[str, typer.Option("--method", "-m", help="Scoring method that picks the channels (see `surgery methods`).")] = "l1",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the plot (PNG) here.")] = None,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Write the rows here (default: --out with .csv).")] = None,
    emit_layer_ratios: Annotated[Optional[Path], typer.Option("--emit-layer-ratios", help="Write PATTERN=RATIO lines for `prune --layer-ratio @FILE`.")] = None,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="Largest accuracy drop a layer ratio may cost (labelled data; default 0.01).")] = None,
    max_error: Annotated[Optional[float], typer.Option("--max-error", help="Largest relative output error a layer ratio may cost (default 0.05 without labels).")] = None,
    option: MethodOpt = None, calib_batches: CalibBatches = None, batch_size: BatchSize = 32,
    input_shape: InputShape = None, trust: Trust = False, weights: Weights = None, kwargs: Kwargs = None, leaf: Leaf = None, debug: Debug = False,
) -> None:
    """Prune each group alone at each ratio (Li et al.) and plot accuracy or output error per group."""

    def work():
        from surgery.planner import split_options
        from surgery.sensitivity import sensitivity as analyse

        if data is None:
            raise SurgeryError("sensitivity needs --data (digits, an image folder, or an .npz/.pt file with x and y)")
        rs = _ratio_list(ratios)
        options = dict(_method_options(option), leaf_modules=tuple(leaf or ()))
        if calib_batches is not None:
            options["calib_batches"] = calib_batches
        split_options(method, options)
        for name, v in (("--max-drop", max_drop), ("--max-error", max_error)):
            if v is not None and not 0.0 <= v < float("inf"):
                raise SurgeryError(f"{name} must be a number >= 0, got {v:g}")
        table_path = csv if csv is not None else (out.with_suffix(".csv") if out is not None else None)
        outputs = [(p, what) for p, what in ((out, "plot"), (table_path, "csv"), (emit_layer_ratios, "layer ratios")) if p is not None]
        for p, what in outputs:
            _check_output(p, model, what)
        resolved = [p.absolute() for p, _ in outputs]
        if len(set(resolved)) != len(resolved):
            raise SurgeryError("--out, --csv and --emit-layer-ratios must be different files")
        with _progress() as step:
            step(f"loading {model}")
            net, x, source = _load(model, trust, weights, input_shape, kwargs)
            calib = _calibration(data, x, batch_size, calib_batches)
            if max_drop is not None and not calib.has_labels:
                raise SurgeryError(f"--max-drop needs labels in --data {data}; use --max-error")
            result = analyse(net, x, calib, rs, method, progress=step, **options)
            step("writing")
            files = []
            if emit_layer_ratios is not None:
                files.append((emit_layer_ratios, result.layer_ratios_text(max_drop, max_error)))
            if out is not None:
                files.append((out, result.png()))
            if table_path is not None:
                files.append((table_path, result.csv_text()))
            _write_all(files)
        _print_sensitivity(source, result, [p for p, _ in files])

    _run(debug, work)


def _write_all(files: list) -> None:
    """Write every ``(path, data)`` atomically; on a failure remove the ones this call created."""
    made = []
    try:
        for path, data in files:
            existed = path.exists()
            checkpoint.atomic_write(path, data)
            if not existed:
                made.append(path)
    except BaseException:
        for path in made:
            path.unlink(missing_ok=True)
        raise


def _print_sensitivity(source, result, written) -> None:
    acc = result.metric == "accuracy"
    what = "top-1 accuracy" if acc else "relative output error"
    table = Table(title=f"{escape(source)}: {what} with one group pruned ({escape(result.method)}, {result.samples} samples)")
    for col in ("group", "layer", "channels", *(f"{r:g}" for r in result.ratios)):
        table.add_column(col, justify="left" if col == "layer" else "right")

    def cell(v) -> str:
        return f"{100 * v:.1f}%" if acc else f"{v:.3f}"

    table.add_row("", "unpruned", "", *([cell(result.baseline["accuracy"] if acc else 0.0)] * len(result.ratios)))
    for gid, rows in result.curves().items():
        table.add_row(str(gid), escape(rows[0].producer or rows[0].label), str(rows[0].size),
                      *(cell(r.accuracy if acc else r.error) for r in rows))
    _out.print(table)
    if result.skipped:
        first = next(iter(result.skipped.values()))
        _out.print(f"{len(result.skipped)} prunable group(s) not analysed, e.g.: {escape(first)}")
    for path in written:
        _out.print(f"written: {escape(str(path))}")
    if not written:
        _out.print("no --out, --csv or --emit-layer-ratios given: nothing written")


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
                checkpoint.atomic_write(out, graph_export.render_text(table) + summary + "\n")
            return
        data = graph_export.export(dep, format, source)
        if out is None:
            print(data if isinstance(data, str) else data.decode())
        else:
            checkpoint.atomic_write(out, data)

    _run(debug, work)


# -- stats --------------------------------------------------------------------------------------
@app.command()
def stats(
    model: ModelArg,
    latency: Annotated[bool, typer.Option("--latency", help="Also time a forward pass on CPU.")] = False,
    input_shape: InputShape = None, trust: Trust = False, weights: Weights = None, kwargs: Kwargs = None, debug: Debug = False,
) -> None:
    """Parameters and MACs of MODEL (and latency with --latency)."""

    def work():
        from surgery.stats import stats as model_stats

        net, x, source = _load(model, trust, weights, input_shape, kwargs)
        s = model_stats(net, x, latency=latency)
        table = Table(title=f"{escape(source)} at input {tuple(x.shape)}")
        table.add_column("")
        table.add_column("value", justify="right")
        for label, n in (("params", s.params), ("MACs", s.macs)):
            table.add_row(label, f"{n:,}" + (f" ({_fmt(n)})" if n >= 1000 else ""))
        if s.latency_ms is not None:
            table.add_row("latency", f"{s.latency_ms:.2f} ms")
        meta = getattr(net, "meta", {}).get("surgery") if hasattr(net, "meta") else None
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
            _out.print(f"needs: {', '.join(n for n in ('weights', 'data', 'labels') if n in m.needs)}")
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


def main() -> None:
    """Entry point for ``python -m surgery.cli``."""
    app()


if __name__ == "__main__":
    main()
