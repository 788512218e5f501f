"""Shared pieces of the command line: the app, common options, error handling, loading, progress."""

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

from ..errors import SurgeryError
from ..io import load_model, parse_input_shape

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Structured pruning for PyTorch: trace, group coupled channels, prune, save.",
)
_out = Console(width=None if Console().is_terminal else 200, highlight=False)
_err = Console(stderr=True, highlight=False, soft_wrap=True)

# -- shared options -----------------------------------------------------------------------------
ModelArg = Annotated[str, typer.Argument(help="A model file (.pt/.pth pickle, .pt2, surgery checkpoint, Caffe .prototxt, .onnx, "
                                              ".keras/.h5/.pb or a SavedModel directory) or a spec: "
                                              "torchvision:NAME, timm:NAME, package.module:factory.")]
InputShape = Annotated[Optional[str], typer.Option("--input-shape", help="Example input shape, e.g. 1,3,224,224.")]
Trust = Annotated[bool, typer.Option("--trust", help="Fully unpickle MODEL (runs code from the file: trusted files only).")]
Weights = Annotated[Optional[Path], typer.Option("--weights", help="A state_dict file loaded into MODEL (for a Caffe .prototxt: its .caffemodel).")]
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
    if os.path.isdir(model) and os.path.isfile(os.path.join(model, "config.json")):  # save_pretrained output
        return _load_language_model(model, trust, shape)
    module, known, source = load_model(model, trust=trust, weights=weights, kwargs=_builder_kwargs(kwargs), input_shape=shape)
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


def _load_language_model(path: str, trust: bool, shape):
    """A Hugging Face model directory: token ids of ``shape`` (default 1 x 128) as the example input."""
    from surgery.hf.load import load_language_model

    module, source = load_language_model(path, trust=trust)
    module.config.use_cache = False  # a KV cache output cannot be traced
    shape = tuple(shape or (1, 128))
    if len(shape) != 2:
        raise SurgeryError(f"a language model takes token ids of shape (batch, sequence), got --input-shape {shape}")
    vocab = int(getattr(module.config, "vocab_size", 2))
    return module, torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0)), source


def _calibration(data: str | None, x: torch.Tensor, batch_size: int, calib_batches: int | None, model=None):
    if data is None:
        return None
    from surgery.calibration.text import is_text_spec, text_calibration

    if is_text_spec(data):  # 'pydoc' or a .txt file: token blocks shaped like the example input
        if model is None or x.is_floating_point():
            raise SurgeryError(f"text --data {data} needs a language model (a save_pretrained directory)")
        return text_calibration(data, model, (x,))
    from surgery.calibration import Calibration, load_data

    xs, ys = load_data(data, tuple(x.shape))
    if calib_batches is not None and calib_batches < 1:
        raise SurgeryError(f"--calib-batches must be a positive integer, got {calib_batches}")
    return Calibration(xs if ys is None else (xs, ys), batch_size=batch_size)
