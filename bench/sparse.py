"""Where does sparse inference beat dense on this CPU? CSR weight @ dense activations against the dense kernel.

Linear layers: ``torch.sparse.mm(W_csr, x^T)^T`` against ``F.linear``. Convolutions: im2col
(``F.unfold``, timed as part of the sparse path) + ``torch.sparse.mm(W_csr, columns)`` against
``F.conv2d``. Weights are random with the smallest-magnitude share zeroed (magnitude-unstructured at
that sparsity); the sparse result is checked against the dense one. Median of ``--runs`` timed calls
after warm-up, one thread.

    .venv/bin/python bench/sparse.py            # print the table
    .venv/bin/python bench/sparse.py --readme   # and write it into README.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from readme_section import replace_section  # noqa: E402

SPARSITIES = (0.5, 0.7, 0.9, 0.95, 0.99)
#: (name, weight shape, input shape): Linear weights are (out, in) with a (batch, in) input; conv
#: weights (out, in, k, k) with a (1, in, h, w) input and padding k // 2.
LAYERS = (
    ("linear 1024 -> 1024, batch 1", (1024, 1024), (1, 1024)),
    ("linear 4096 -> 4096, batch 1", (4096, 4096), (1, 4096)),
    ("linear 768 -> 3072, batch 128", (3072, 768), (128, 768)),
    ("conv 3x3 64 -> 64, 56x56", (64, 64, 3, 3), (1, 64, 56, 56)),
    ("conv 3x3 256 -> 256, 14x14", (256, 256, 3, 3), (1, 256, 14, 14)),
    ("conv 1x1 512 -> 2048, 7x7", (2048, 512, 1, 1), (1, 512, 7, 7)),
)


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


def _sparse_weight(shape, sparsity: float) -> torch.Tensor:
    w = torch.randn(shape)
    k = int(sparsity * w.numel())
    if k:
        drop = w.abs().flatten().argsort()[:k]
        w.view(-1)[drop] = 0.0
    return w


def _paths(w: torch.Tensor, x: torch.Tensor):
    """(dense call, sparse call) computing the same layer output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        csr = w.reshape(w.shape[0], -1).to_sparse_csr()
    if w.dim() == 2:
        return (lambda: F.linear(x, w)), (lambda: torch.sparse.mm(csr, x.t()).t())
    pad = w.shape[-1] // 2
    h, wd = x.shape[-2:]

    def sparse_conv():
        cols = F.unfold(x, w.shape[-2:], padding=pad)[0]  # (in*k*k, h*w)
        return torch.sparse.mm(csr, cols).reshape(1, w.shape[0], h, wd)

    return (lambda: F.conv2d(x, w, padding=pad)), sparse_conv


def measure(runs: int) -> list[dict]:
    rows = []
    for name, wshape, xshape in LAYERS:
        x = torch.randn(xshape)
        dense_ms = None
        for s in SPARSITIES:
            w = _sparse_weight(wshape, s)
            dense, sparse = _paths(w, x)
            with torch.no_grad():
                err = (sparse() - dense()).abs().max().item() / dense().abs().max().item()
            if err > 1e-4:
                raise SystemExit(f"{name} at {s:.0%}: sparse and dense results differ (relative error {err:.1e})")
            if dense_ms is None:  # a dense kernel does not care about zeros: time it once per layer
                dense_ms = _time(dense, runs)
            rows.append({"layer": name, "sparsity": s, "dense_ms": dense_ms, "sparse_ms": _time(sparse, runs)})
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| layer | sparsity | dense ms | CSR ms | CSR / dense |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['sparsity']:.0%} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | "
                     f"{r['sparse_ms'] / r['dense_ms']:.2f}x |")
    first = {}  # layer -> lowest sparsity from which CSR stays faster at every higher sparsity measured
    for layer in dict.fromkeys(r["layer"] for r in rows):
        mine = [r for r in rows if r["layer"] == layer]
        for i, r in enumerate(mine):
            if all(q["sparse_ms"] < q["dense_ms"] for q in mine[i:]):
                first[layer] = r["sparsity"]
                break
    linear = [layer for layer in first if layer.startswith("linear")]
    all_linear = [r["layer"] for r in rows if r["layer"].startswith("linear")]
    where = "; ".join(f"{layer} from {s:.0%}" for layer, s in first.items()) or "no layer at any sparsity measured"
    never = sorted(set(r["layer"] for r in rows) - set(first))
    if linear and set(linear) == set(all_linear):
        bar = max(first[layer] for layer in linear)
        offer = (f"So surgery offers sparse inference for Linear layers only: `surgery.sparsity.sparse_inference(model, "
                 f"min_sparsity={bar:g})` swaps each `nn.Linear` at or above that sparsity for a `SparseLinear` "
                 f"(CSR weight, `torch.sparse.mm`); every Linear shape here wins from {bar:.0%}, the default "
                 f"threshold is 0.95. Convolutions stay "
                 f"dense: im2col + CSR wins only for some shapes, and a large feature map pays more for the unfold "
                 f"than the zeros save.")
    else:
        offer = ("CSR does not win for every Linear shape at realistic sparsities here, so use "
                 "`surgery.sparsity.sparse_inference` only on layers measured to win; an unstructured checkpoint "
                 "otherwise loads as dense weights with zeros (CSR saves disk, not time).")
    verdict = f"CSR is faster for {where}" + (f"; never for {', '.join(never)}" if never else "") + f". {offer}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    head = (f"torch {torch.__version__}, one CPU thread, {platform.machine()} ({os.cpu_count()} cores, load average "
            f"{load:.1f} when the table was written: shared machine, times are medians); float32; "
            f"`torch.sparse.mm` on a CSR weight (conv: `F.unfold` + `torch.sparse.mm`, unfold timed) against "
            f"`F.linear` / `F.conv2d`.")
    return f"{head}\n\n" + "\n".join(lines) + f"\n\nA ratio below 1 means CSR is faster. {verdict}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--readme", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    text = render(measure(args.runs))
    print(text)
    if args.readme:
        replace_section("sparse-bench", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
