"""The README's methods table, generated from the method registry (name, paper, needs, what it
scores, options with defaults).

    .venv/bin/python bench/methods_table.py            # print the markdown table
    .venv/bin/python bench/methods_table.py --readme   # and write it into README.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from readme_section import replace_section  # noqa: E402

from surgery.methods import get_method, list_methods  # noqa: E402


def table() -> str:
    rows = ["| method | paper | needs | scores | options (default) |", "|---|---|---|---|---|"]
    for name in list_methods():
        m = get_method(name)
        needs = "data + labels" if m.needs_labels else "data" if m.needs_data else "weights" if "weights" in m.needs else "-"
        opts = ", ".join(f"`{o.name}` ({o.default!r})" for o in m.options) or "-"
        cells = (f"`{name}`", m.paper or "-", needs, m.summary, opts)
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    text = table()
    print(text)
    if ap.parse_args().readme:
        replace_section("methods", text)
