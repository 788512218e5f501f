"""surgery eval: perplexity of a language model on text (sliding windows over the held-out tail)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..errors import SurgeryError
from ._common import Debug, Trust, _out, _run, app


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="A save_pretrained directory, a surgery checkpoint, or a spec/pickle (as prune).")],
    data: Annotated[str, typer.Option("--data", help="Text: 'pydoc' (built-in) or a UTF-8 .txt file; its last 10% is evaluated.")] = "pydoc",
    seq_len: Annotated[int, typer.Option("--seq-len", help="Window length in tokens.")] = 128,
    stride: Annotated[Optional[int], typer.Option("--stride", help="Tokens between window starts (default: --seq-len).")] = None,
    max_windows: Annotated[Optional[int], typer.Option("--max-windows", help="Evaluate at most this many windows.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="A tokenizer name or directory loadable offline (default: the model's, else a BPE trained on the text).")] = None,
    trust: Trust = False, debug: Debug = False,
):
    """Perplexity of MODEL on --data: exp(mean next-token loss), every held-out token scored once."""

    def work():
        from surgery.calibration.text import is_text_spec
        from surgery.hf import perplexity
        from surgery.hf.load import load_language_model

        if not is_text_spec(data):
            raise SurgeryError(f"--data must be 'pydoc' or a .txt file, got {data!r}")
        net, source = load_language_model(model, trust=trust)
        ppl = perplexity(net, data, seq_len=seq_len, stride=stride, tokenizer=tokenizer, max_windows=max_windows)
        _out.print(f"{escape(source)}: perplexity {ppl:.3f} on {escape(data)} (held-out 10%, windows of {seq_len})")

    _run(debug, work)
