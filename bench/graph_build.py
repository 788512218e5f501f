"""Benchmark: time to build the full dependency graph and ALL groups, surgery vs Torch-Pruning.

Both tools run in the same process, on the same model instance:

* surgery:       ``g = surgery.trace(model, x); g.groups``   (groups are solved inside ``trace``)
* Torch-Pruning: ``DG = tp.DependencyGraph().build_dependency(model, example_inputs=x)``
                 then ``list(DG.get_all_groups())`` (default roots: Conv + Linear)

Each timing is the best of ``--repeats`` runs (``time.perf_counter``); the huge models and any
run slower than ``--slow-run`` seconds are measured fewer times.  A Torch-Pruning run that goes
past ``--peer-timeout`` seconds is interrupted (SIGALRM) and reported as a timeout.

Models: torchvision resnet50, densenet121, densenet201, regnet_y_128gf (weights=None, eval,
1x3x224x224) and a synthetic residual net of 100 / 400 / 1600 blocks (16 channels, 8x8 input).

Usage::

    python bench/graph_build.py                 # everything (regnet_y_128gf needs ~10 GB RAM)
    python bench/graph_build.py --quick         # resnet50 + res100 + res400 (smoke run)
    python bench/graph_build.py --models resnet50 res1600 --repeats 5
    python bench/graph_build.py --profile       # cProfile surgery wherever it is slower

This is a benchmark, not a test: it always exits 0.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import platform
import pstats
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import surgery  # noqa: E402

try:
    import torch_pruning as tp
except ImportError:  # pragma: no cover - depends on the environment
    tp = None


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "n/a"

TORCHVISION_MODELS = ["resnet50", "densenet121", "densenet201", "regnet_y_128gf"]
SYNTHETIC_DEPTHS = [100, 400, 1600]
ALL_MODELS = TORCHVISION_MODELS[:3] + [f"res{d}" for d in SYNTHETIC_DEPTHS] + ["regnet_y_128gf"]
QUICK_MODELS = ["resnet50", "res100", "res400"]
# most repeats for a model whose single run is expensive (fx + meta tracing of ~650M params,
# a real CPU forward for Torch-Pruning)
MAX_REPEATS = {"regnet_y_128gf": 1, "res1600": 2}


# -- models -------------------------------------------------------------------------------------
class Block(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, + identity skip, ReLU."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class DeepResNet(nn.Module):
    """Stem conv -> ``depth`` residual blocks -> global pool -> linear (so the stream is prunable)."""

    def __init__(self, depth: int, c: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(*[Block(c) for _ in range(depth)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def build_model(name: str) -> tuple[nn.Module, torch.Tensor, int | None]:
    """(model in eval mode, example input, number of blocks or None)."""
    if name.startswith("res") and name[3:].isdigit():
        depth = int(name[3:])
        return DeepResNet(depth).eval(), torch.randn(1, 3, 8, 8), depth
    import torchvision

    model = getattr(torchvision.models, name)(weights=None).eval()
    return model, torch.randn(1, 3, 224, 224), None


# -- timing -------------------------------------------------------------------------------------
class PeerTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise PeerTimeout


def run_surgery(model, x):
    g = surgery.trace(model, x)
    groups = g.groups
    return g, groups


def run_tp(model, x):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    groups = list(dg.get_all_groups())  # defaults: ignored_layers=[], roots = Conv + Linear
    return dg, groups


def _clear_hooks(model: nn.Module) -> None:
    """Drop hooks an interrupted Torch-Pruning trace may have left on the model."""
    for m in model.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()


@dataclass
class Timing:
    best: float | None = None
    runs: list[float] = field(default_factory=list)
    groups: int | None = None
    prunable: int | None = None
    nodes: int | None = None
    error: str = ""


def time_tool(tool: str, model, x, repeats: int, slow_run: float, timeout: float | None) -> Timing:
    res = Timing()
    for _ in range(repeats):
        gc.collect()
        if timeout:
            old = signal.signal(signal.SIGALRM, _alarm)
            signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            t0 = time.perf_counter()
            graph, groups = run_surgery(model, x) if tool == "surgery" else run_tp(model, x)
            dt = time.perf_counter() - t0
        except PeerTimeout:
            _clear_hooks(model)
            res.error = f"timeout >{timeout:g}s"
            return res
        except Exception as exc:  # a benchmark reports failures, it does not stop on them
            res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
            return res
        finally:
            if timeout:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)
        res.runs.append(dt)
        res.groups = len(groups)
        if tool == "surgery":
            res.prunable = sum(1 for g in groups if g.prunable)
            res.nodes = len(graph.fx_graph.nodes)
        else:
            res.nodes = len(graph.module2node)
        del graph, groups
        if dt > slow_run:
            break
    gc.collect()
    res.best = min(res.runs)
    return res


def profile_surgery(model, x, top: int = 15) -> str:
    gc.collect()
    prof = cProfile.Profile()
    prof.enable()
    run_surgery(model, x)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


# -- report -------------------------------------------------------------------------------------
def _fmt_t(t: Timing) -> str:
    if t.error:
        return t.error
    n = len(t.runs)
    return f"{t.best:.3f}" + ("" if n > 1 else " (1 run)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=ALL_MODELS, help="subset of models (default: all)")
    ap.add_argument("--repeats", type=int, default=3, help="best of N runs per tool (default 3)")
    ap.add_argument("--quick", action="store_true", help="only resnet50 + res100 + res400 (smoke run)")
    ap.add_argument("--peer-timeout", type=float, default=600.0, help="seconds before a Torch-Pruning run is abandoned")
    ap.add_argument("--slow-run", type=float, default=20.0, help="stop repeating a tool after a run this slow (s)")
    ap.add_argument("--no-peer", action="store_true", help="measure surgery only")
    ap.add_argument("--profile", action="store_true", help="cProfile surgery (top 15 cumulative) where it is slower")
    ap.add_argument("--profile-models", nargs="+", default=[], choices=ALL_MODELS, help="always profile these")
    args = ap.parse_args(argv)

    models = QUICK_MODELS if args.quick else (args.models or ALL_MODELS)
    models = [m for m in ALL_MODELS if m in models]  # cheap first, regnet_y_128gf last
    use_peer = tp is not None and not args.no_peer
    if tp is None:
        print("torch_pruning is not installed (pip install torch-pruning): measuring surgery only.")

    print(
        f"# graph build benchmark: python {platform.python_version()}, torch {torch.__version__}, "
        f"surgery {surgery.__version__}, torch-pruning {_version('torch-pruning') if tp else 'n/a'}, "
        f"{torch.get_num_threads()} threads, {platform.machine()}"
    )
    print(f"# best of {args.repeats} (fewer for {', '.join(f'{k}: {v}' for k, v in MAX_REPEATS.items())}; "
          f"or after a run > {args.slow_run:g}s)", flush=True)

    # warm both tools up (lazy imports, rule registries, first-call caches) on a tiny net
    wm, wx, _ = build_model("res2")
    run_surgery(wm, wx)
    if use_peer:
        run_tp(wm, wx)
    del wm, wx

    rows = []
    results: dict[str, tuple[Timing, Timing | None]] = {}
    profiles: dict[str, str] = {}
    for name in models:
        t0 = time.perf_counter()
        model, x, blocks = build_model(name)
        print(f"- {name}: built in {time.perf_counter() - t0:.1f}s", end="", flush=True)
        reps = min(args.repeats, MAX_REPEATS.get(name, args.repeats))
        ours = time_tool("surgery", model, x, reps, args.slow_run, None)
        print(f"; surgery {_fmt_t(ours)}", end="", flush=True)
        peer = None
        if use_peer:
            peer = time_tool("tp", model, x, reps, args.slow_run, args.peer_timeout)
            print(f"; torch-pruning {_fmt_t(peer)}", end="", flush=True)
        print(flush=True)
        results[name] = (ours, peer)

        loses = peer is not None and ours.best is not None and peer.best is not None and ours.best > peer.best
        if name in args.profile_models or (args.profile and loses):
            profiles[name] = profile_surgery(model, x)

        size = f"{ours.nodes} nodes" if ours.nodes is not None else "?"
        if blocks is not None:
            size = f"{blocks} blocks / {size}"
        if ours.best and peer is not None and peer.best:
            speedup = f"{peer.best / ours.best:.2f}x"
        else:
            speedup = "n/a"
        ours_groups = f"{ours.groups} ({ours.prunable} prunable)" if ours.groups is not None else "n/a"
        peer_groups = str(peer.groups) if peer is not None and peer.groups is not None else "n/a"
        rows.append([name, size, _fmt_t(ours), _fmt_t(peer) if peer else "not run", speedup, ours_groups, peer_groups])
        del model, x
        gc.collect()

    header = ["model", "nodes/blocks", "surgery s", "torch-pruning s", "speedup (tp/surgery)", "surgery groups",
              "tp groups"]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")

    # growth per 4x depth on the synthetic nets (linear ~ 4x, quadratic ~ 16x)
    depths = [d for d in SYNTHETIC_DEPTHS if f"res{d}" in results]
    pairs = list(zip(depths, depths[1:]))
    if pairs:
        print()
        print("| synthetic depth | surgery growth | torch-pruning growth |")
        print("|---|---|---|")
        for a, b in pairs:
            cells = []
            for i in (0, 1):
                ta, tb = results[f"res{a}"][i], results[f"res{b}"][i]
                if ta is not None and tb is not None and ta.best and tb.best:
                    cells.append(f"{tb.best / ta.best:.2f}x")
                else:
                    cells.append("n/a")
            print(f"| {a} -> {b} ({b // a}x blocks) | {cells[0]} | {cells[1]} |")

    for name, text in profiles.items():
        print(f"\n## cProfile of surgery.trace on {name} (top 15 cumulative)\n")
        print(text.rstrip())
    return 0


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted")
    sys.exit(0)
