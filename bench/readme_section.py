"""Write a generated table into README.md between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``.

Tables in the README are written by scripts, never typed: each script that produces one calls
``replace_section(name, text)`` (or pipes its output here: ``python bench/readme_section.py NAME < table.md``).
"""

from __future__ import annotations

import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def replace_section(name: str, text: str, readme: Path = README) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    doc = readme.read_text()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{readme} has no {begin} ... {end} markers")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{text.strip()}\n{end}{tail}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python bench/readme_section.py NAME < table.md")
    replace_section(sys.argv[1], sys.stdin.read())
