"""The ``surgery`` command line: parse, call one API function, print with rich (one file per command).

    surgery prune MODEL --method l1 --ratio 0.5 [--global] [--layer-ratio NAME=R ...] [--out F]
                  [--data D] [--target-macs 0.5] [--round-to 8] [--option NAME=VALUE ...]
                  [--format dense|csr] [--plan-out plan.json] [--plan plan.json]
    surgery sensitivity MODEL --data D [--ratios 0.1,0.3,0.5,0.7] [--method l1] [--out sens.png]
                  [--csv F] [--emit-layer-ratios F] [--max-drop 0.01] [--max-error 0.05]
    surgery graph MODEL [--format text|json|dot|graphml|png] [--out F]
    surgery stats MODEL [--latency]
    surgery methods [NAME]
    surgery export MODEL --format onnx|pt2 --out F [--opset N] [--dynamic-batch]
    surgery eval MODEL [--data pydoc|corpus.txt] [--seq-len 128] [--stride N] [--max-windows N]

Every command takes ``--input-shape 1,3,224,224``, ``--trust``, ``--weights F``, ``--leaf NAME``
(where it loads a model) and ``--debug``. Errors print one red line on stderr and exit 1 (usage
errors exit 2); ``--debug`` shows the traceback. Output files are written atomically, after all the
work succeeded, and never over the input model.
"""

from __future__ import annotations

from . import prune, sensitivity, inspect, finetune, train, export  # noqa: F401,I001  (each registers its command, in this order)
from . import eval  # noqa: F401,E402  (surgery eval: perplexity of a language model)
from ._common import app

__all__ = ["app", "main"]


def main() -> None:
    """Entry point for ``python -m surgery.cli``."""
    app()
