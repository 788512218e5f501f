"""Calibration data in, activation statistics out.

``data.py`` turns what a user passes (a tensor, ``(x, y)``, an iterable or DataLoader; on the command
line an image folder, an ``.npz``/``.pt`` file or the built-in ``digits``) into batches; ``text.py``
turns text (``"pydoc"``, a ``.txt`` file) into token-id blocks for language models;
``recorder.py`` runs the traced graph over them and hands each watched activation (and, when asked,
its gradient) to a method, one batch at a time, so memory stays bounded.
"""

from .data import Calibration, load_data
from .recorder import record
from .text import text_blocks, text_calibration

__all__ = ["Calibration", "load_data", "record", "text_blocks", "text_calibration"]
