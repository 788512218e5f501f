"""surgery sensitivity."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .._files import atomic_write
from ..errors import SurgeryError
from ._common import (
    BatchSize, CalibBatches, Data, Debug, InputShape, Kwargs, Leaf, MethodOpt, ModelArg, Trust, Weights,
    _calibration, _check_output, _load, _method_options, _out, _progress, _run, app,
)


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
            atomic_write(path, data)
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
