"""Benchmark: ThiNet's cost against one forward pass, and the Gram greedy against the naive greedy.

1. For torchvision resnet18 / resnet50 (weights=None, eval) at 64x64 with 256 random calibration
   images (batches of 32): the time of one forward pass over those images (plain ``model(x)``,
   no_grad) and the time ThiNet takes to score and plan on an already traced graph
   (``plan_from_graph``: the calibration pass that streams ``G = X^T X`` per group, the greedy, the
   least-squares folds of the selection). Target: ThiNet within 3x of the forward pass.
2. On one layer (the widest inner group of the last model: its sampled contributions ``X``, 10 per
   image), the Gram greedy (``G = X^T X`` then O(C) per removal) against the naive greedy that
   recomputes ``||X[:, T + c] 1||^2`` from ``X`` for every candidate (vectorised over candidates:
   O(m C) per removal), and whether both remove the channels in the same order.

Usage::

    python bench/thinet.py            # resnet18 + resnet50, 256 images at 64x64, 1 thread
    python bench/thinet.py --quick    # resnet18, 64 images at 32x32 (CI smoke run, seconds)

Prints markdown tables. Timings are the best of ``--repeats`` runs, the forward pass and ThiNet
alternating within each repeat so that both see the same machine load; ``--threads`` defaults to 1
because two threads on a shared 2-core machine swing by 10x from run to run. This is a benchmark, not a test: it exits 0 unless
the two greedies disagree.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import surgery  # noqa: E402
from surgery.calibration import Calibration, record  # noqa: E402
from surgery.planner import plan_from_graph  # noqa: E402
from surgery.roles import consumers, producers  # noqa: E402

thinet = importlib.import_module("surgery.methods.thinet")
gram = importlib.import_module("surgery.methods._gram")


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def forward_pass(model, x: torch.Tensor, batch: int) -> None:
    with torch.no_grad():
        for xb in x.split(batch):
            model(xb)


def naive_greedy(X: np.ndarray) -> np.ndarray:
    """ICCV greedy straight from X: for every candidate c, ||sum of removed columns + x_c||^2."""
    m, C = X.shape
    removed_sum = np.zeros(m)
    left = np.ones(C, dtype=bool)
    order = np.empty(C, dtype=np.int64)
    for step in range(C):
        cost = ((removed_sum[:, None] + X) ** 2).sum(0)
        cost[~left] = np.inf
        c = int(np.argmin(cost))
        order[step] = c
        removed_sum += X[:, c]
        left[c] = False
    return order


def layer_xy(model, graph, x: torch.Tensor, per_image: int):
    """X for the widest inner group of ``graph`` (its single consumer), over all of ``x``."""
    inner = [g for g in graph.prunable_groups if len(producers(graph, g)) == 1 and len(consumers(graph, g)) == 1]
    group = max(inner, key=lambda g: g.size)
    (site, member), = consumers(graph, group)
    rows = []

    def visit(acts, _g, _l):
        rows.append(thinet.batch_xy(graph, group, site, member, acts[site.input], acts[site.node], per_image, len(rows))[0])

    record(graph, Calibration(x, batch_size=32), {site.input, site.node}, visit)
    return group, site, np.concatenate(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="resnet18, 64 images at 32x32")
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable on a shared machine)")
    ap.add_argument("--readme", action="store_true", help="also write the tables into README.md")
    args = ap.parse_args(argv)
    if args.readme:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = _run(args)
        print(buf.getvalue(), end="")
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from readme_section import replace_section

        replace_section("thinet-bench", buf.getvalue())
        return code
    return _run(args)


def _run(args) -> int:
    torch.set_num_threads(args.threads)
    models = args.models or (["resnet18"] if args.quick else ["resnet18", "resnet50"])
    n = args.images or (64 if args.quick else 256)
    size = args.size or (32 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)
    tv = importlib.import_module("torchvision")
    torch.manual_seed(0)
    x = torch.randn(n, 3, size, size)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"{n} random images at {size}x{size}, batches of {args.batch}, ratio {args.ratio}, best of {repeats}\n")
    print("| model | forward s | ThiNet s | ThiNet / forward | thinet-forward s | groups scored (skipped) | trace s |")
    print("|---|---|---|---|---|---|---|")
    last = None
    for name in models:
        model = getattr(tv.models, name)(weights=None).eval()
        t_trace, graph = best_of(lambda: surgery.trace(model, x[:1]), 1)
        cal = Calibration(x, batch_size=args.batch)
        t_fwd = t_thi = t_fw = float("inf")
        for _ in range(repeats):  # interleaved: each repeat times all three under the same load
            t_fwd = min(t_fwd, best_of(lambda: forward_pass(model, x, args.batch), 1)[0])
            t, plan = best_of(lambda: plan_from_graph(model, graph, "thinet", args.ratio, cal), 1)
            t_thi = min(t_thi, t)
            t_fw = min(t_fw, best_of(lambda: plan_from_graph(model, graph, "thinet-forward", args.ratio, cal), 1)[0])
        print(f"| {name} | {t_fwd:.2f} | {t_thi:.2f} | {t_thi / t_fwd:.2f}x | {t_fw:.2f} | "
              f"{len(plan.groups)} ({len(plan.notes)}) | {t_trace:.2f} |")
        last = (model, graph)

    model, graph = last
    group, site, X = layer_xy(model, graph, x, 10)
    t_naive, naive = best_of(lambda: naive_greedy(X), repeats)

    def with_gram():
        return gram.backward_order(X.T @ X)

    t_gram, fast = best_of(with_gram, repeats)
    G = X.T @ X
    t_greedy, _ = best_of(lambda: gram.backward_order(G), repeats)
    same = bool(np.array_equal(naive, fast))
    print(f"\n| layer ({models[-1]}) | channels | samples | naive greedy s | Gram greedy s (incl. X^T X) | "
          "greedy on G s | speed-up | same removal order |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {site.owner} input | {group.size} | {X.shape[0]} | {t_naive:.3f} | {t_gram:.3f} | {t_greedy:.4f} | "
          f"{t_naive / t_gram:.0f}x | {'yes' if same else 'NO'} |")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
