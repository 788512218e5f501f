"""Families sweep: the model styles people most want to prune, end to end through the pipeline.

For each family in ``bench/family_models.py`` (written in-repo in the style of YOLOv8, UNet, a
diffusion UNet, an audio encoder, and torchvision's detector with its backbone pruned in place):
front end, groups (prunable), share of parameters in prunable groups, pruned == masked, the class
of the result (the user's own, or a GraphModule and why), whether it runs at another batch size and
input shape, and whether it saves and reloads to identical outputs.

    .venv/bin/python bench/families.py            # print the table
    .venv/bin/python bench/families.py --readme   # and write it into README.md
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from family_models import FAMILIES  # noqa: E402
from readme_section import replace_section  # noqa: E402

import surgery  # noqa: E402
from surgery.coverage import coverage  # noqa: E402
from surgery.module_tree import output_tensors  # noqa: E402
from surgery.pipeline import run  # noqa: E402




def _rel(a, b) -> float:
    return max((float((x - y).norm() / y.norm().clamp_min(1e-12)) for x, y in zip(output_tensors(a), output_tensors(b))), default=0.0)


def one(name: str) -> dict:
    build, example, other, options = FAMILIES[name]
    torch.manual_seed(0)
    model = build().eval()
    x, x2 = example(), other()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run(model, x, "group-l1", 0.5, **options)
        masked = surgery.apply(model, res.plan, mode="mask")
    row = {"family": name, "front end": res.graph.frontend,
           "groups": f"{len(res.graph.groups)} ({sum(g.prunable for g in res.graph.groups)})",
           "prunable share": f"{coverage(res.graph).share:.2f}", "pruned groups": len(res.plan.groups)}
    pruned = res.model
    with torch.no_grad():
        row["pruned == masked"] = f"{_rel(pruned(*x), masked(*x)):.1e}" if "submodule" not in options else \
            f"{_rel(pruned.backbone(*res.graph.example_inputs), masked.backbone(*res.graph.example_inputs)):.1e}"
        why = getattr(pruned, "meta", {}).get("surgery_output", {}).get("reason") if isinstance(pruned, torch.fx.GraphModule) else ""
        row["result"] = type(pruned).__name__ + (f" ({why})" if why else "")
        try:
            pruned(*x2)
            row["other shape"] = "runs"
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            row["other shape"] = f"fails: {type(exc).__name__}"
    try:
        buf = io.BytesIO()
        torch.save(pruned, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
        with torch.no_grad():
            same = all(torch.equal(a, b) for a, b in zip(output_tensors(back(*x)), output_tensors(pruned(*x))))
        row["save/load"] = "identical" if same else "differs"
    except Exception as exc:  # noqa: BLE001
        row["save/load"] = f"fails: {type(exc).__name__}"
    row["seconds"] = f"{time.perf_counter() - t0:.1f}"
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--readme", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [one(name) for name in args.families]
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|") for c in cols) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    if args.readme:
        replace_section("families", f"torch {torch.__version__}, one CPU thread; group-l1 at ratio 0.5.\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
