"""Atomic file writes: the content appears at its path complete, or not at all.

Every file surgery writes (checkpoints, plans, graphs, exports, training checkpoints) goes through
:func:`atomic_write`, so an interrupted or failing write never leaves a half-written file and never
touches what was at the path before.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from .errors import SurgeryError

__all__ = ["atomic_write"]


def atomic_write(path, data: bytes | str | Callable[[str], None]) -> None:
    """Write ``data`` (bytes, text, or a function writing a given path) to ``path`` atomically.

    The content goes to a temporary file in the same directory, which replaces ``path`` only once it
    is complete; on any failure (including ``KeyboardInterrupt``) the temporary file is removed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SurgeryError(f"cannot write {path}: directory {folder} does not exist")
    if os.path.isdir(path):
        raise SurgeryError(f"cannot write {path}: it is a directory")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as exc:
        raise SurgeryError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(tmp)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise SurgeryError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
