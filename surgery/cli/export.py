"""surgery export: write a checkpoint (or any loadable model) as ONNX or a torch.export ``.pt2``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..errors import SurgeryError
from ._common import Debug, InputShape, Kwargs, ModelArg, Trust, Weights, _check_output, _load, _out, _run, app


@app.command()
def export(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="The file to write (.onnx or .pt2).")],
    format: Annotated[str, typer.Option("--format", "-f", help="onnx or pt2.")] = "onnx",
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default 18).")] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Let the batch dim take any size.")] = False,
    input_shape: InputShape = None, trust: Trust = False, weights: Weights = None, kwargs: Kwargs = None,
    debug: Debug = False,
) -> None:
    """Export MODEL (a surgery checkpoint or any model spec/file) to ONNX or a .pt2 program."""

    def work():
        from surgery.interchange import FORMATS, export as export_model

        if format not in FORMATS:
            raise SurgeryError(f"unknown export format {format!r}; known formats: {', '.join(FORMATS)}")
        if opset is not None and format != "onnx":
            raise SurgeryError("--opset applies to --format onnx only")
        _check_output(out, model, "export")
        net, x, source = _load(model, trust, weights, input_shape, kwargs)
        export_model(net, out, format=format, example_inputs=x, opset=opset, dynamic_batch=dynamic_batch)
        batch = "any batch" if dynamic_batch else f"batch {x.shape[0]}"
        _out.print(f"wrote {escape(str(out))} ({format}, input {tuple(x.shape[1:])} at {batch}) from {escape(source)}")

    _run(debug, work)
