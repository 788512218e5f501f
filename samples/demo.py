"""End-to-end demo: train a small ResNet on scikit-learn's handwritten digits, save it, prune the
saved checkpoint with the ``surgery`` command line, reload the pruned checkpoint, fine-tune briefly,
and print accuracy / params / MACs / latency before and after.

Real data that ships with scikit-learn (1797 8x8 digits, upsampled to 16x16); no download.
Runs in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import surgery  # noqa: E402
from surgery.calibration.data import digits as builtin_digits  # noqa: E402
from surgery.methods import get_method  # noqa: E402
from samples.resnet_mini import resnet_mini  # noqa: E402


def digits(size: int = 16):
    """The built-in calibration set (``--data digits``), split into train and test."""
    x, y = builtin_digits((1, 1, size, size))
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return (xtr, ytr), (xte, yte)


def train(model, data, epochs: int, lr: float, batch: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = data
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * ((len(x) + batch - 1) // batch))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    x, y = data
    return float((model(x).argmax(1) == y).float().mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--method", default="thinet", choices=surgery.methods())
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--finetune", type=int, default=3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train_set, test_set = digits()
    example = train_set[0][:1]
    console = Console()

    t0 = time.perf_counter()
    model = resnet_mini()
    train(model, train_set, args.epochs, lr=0.05)
    console.print(f"trained {args.epochs} epochs in {time.perf_counter() - t0:.1f}s")

    before = surgery.stats(model, example, latency=True, runs=20)
    acc_before = accuracy(model, test_set)
    with tempfile.TemporaryDirectory() as tmp:
        trained, small = Path(tmp, "trained.pt"), Path(tmp, "pruned.pt")
        surgery.save(model, trained, metadata={"source": "samples.resnet_mini:resnet_mini", "dataset": "sklearn digits"})
        cli = [shutil.which("surgery") or sys.executable, *([] if shutil.which("surgery") else ["-m", "surgery.cli"])]
        data = ["--data", "digits", "--calib-batches", "8"] if get_method(args.method).needs_data else []
        cmd = [*cli, "prune", str(trained), "--method", args.method, "--ratio", str(args.ratio),
               "--input-shape", ",".join(map(str, example.shape)), *data, "--out", str(small)]
        console.print(f"$ surgery prune trained.pt --method {args.method} --ratio {args.ratio} {' '.join(data)} --out pruned.pt")
        subprocess.run(cmd, check=True)
        pruned = surgery.load(small)
    acc_pruned = accuracy(pruned, test_set)
    train(pruned, train_set, args.finetune, lr=0.02, seed=1)
    acc_after = accuracy(pruned, test_set)
    after = surgery.stats(pruned, example, latency=True, runs=20)

    table = Table(title=f"ResNetMini on digits: {args.method} pruning at ratio {args.ratio}")
    for col in ("", "before", "pruned", "pruned + fine-tuned"):
        table.add_column(col, justify="right")
    table.add_row("test accuracy", f"{acc_before:.3f}", f"{acc_pruned:.3f}", f"{acc_after:.3f}")
    table.add_row("params", f"{before.params:,}", f"{after.params:,}", f"{after.params:,}")
    table.add_row("MACs", f"{before.macs:,}", f"{after.macs:,}", f"{after.macs:,}")
    table.add_row("latency (ms, batch 1)", f"{before.latency_ms:.2f}", f"{after.latency_ms:.2f}", f"{after.latency_ms:.2f}")
    console.print(table)
    console.print(f"total {time.perf_counter() - t0:.1f}s")
    return 0 if np.isfinite(acc_after) else 1


if __name__ == "__main__":
    raise SystemExit(main())
