"""StripeConv (SWP) CPU latency against the dense conv and the masked dense conv (same FLOPs as dense),
at several fractions of live stripes. Median of ``--runs`` timed forwards after warm-up, one thread.

    .venv/bin/python bench/stripe.py            # print the table
    .venv/bin/python bench/stripe.py --readme   # and write it into README.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from readme_section import replace_section  # noqa: E402

from surgery.layers import StripeConv  # noqa: E402


def _time(fn, runs: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--readme", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = ["| conv (C_in -> C_out, input) | live stripes | dense ms | masked ms | StripeConv ms | stripe / dense |",
            "|---|---|---|---|---|---|"]
    for cin, cout, hw in ((64, 64, 32), (128, 128, 16)):
        conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        x = torch.randn(1, cin, hw, hw)
        dense = _time(lambda: conv(x), args.runs)
        for frac in (1.0, 0.5, 0.25, 0.1):
            alive = torch.rand(cout, 3, 3) < frac
            masked_w = conv.weight * alive[:, None]
            masked = _time(lambda: F.conv2d(x, masked_w, padding=1), args.runs)
            s = StripeConv.from_conv(conv, alive)
            stripe = _time(lambda: s(x), args.runs)
            rows.append(f"| {cin} -> {cout}, {hw}x{hw} | {frac:.0%} | {dense:.3f} | {masked:.3f} | {stripe:.3f} | "
                        f"{stripe / dense:.2f}x |")
    text = (f"torch {torch.__version__}, one CPU thread, batch 1, 3x3 kernels.\n\n" + "\n".join(rows)
            + "\n\nA ratio above 1 means StripeConv is slower than the dense convolution it replaces: its 9 shifted "
              "1x1 convolutions and index-adds cost more than one well-tuned 3x3 kernel unless few stripes live.")
    print(text)
    if args.readme:
        replace_section("stripe-bench", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
