"""Benchmark: tracing and grouping a large language model, surgery vs Torch-Pruning.

Two models, each measured in a fresh subprocess per tool (so peak RSS is the tool's own):

* ``qwen3-8b-meta``: the Qwen3-8B shape (36 layers, hidden 4096, 32 query heads, 8 KV heads,
  head_dim 128, intermediate 12288, vocabulary 151936) built on the meta device: no weights in
  memory, as one plans an 8B model on a laptop. The issue's target: traced and grouped in < 10 s and
  < 3 GB RSS, with heads, KV groups, MLP and hidden prunable; then a ``random`` uniform plan.
* ``qwen3-small``: the same architecture at 8 layers, hidden 1024, 16/4 heads, intermediate 3072 and
  a 32000 vocabulary, with real (random) CPU weights, where both tools can run.

surgery: ``surgery.trace(model, ids)`` (one static ``torch.export`` on meta, then the dependency
graph and all groups). Torch-Pruning: ``tp.DependencyGraph().build_dependency(model, example_inputs=ids)``
and ``list(DG.get_all_groups())``. A failure is reported with its first line.

Usage::

    python bench/llm_scale.py             # both models (~1 min)
    python bench/llm_scale.py --only qwen3-8b-meta
    python bench/llm_scale.py --readme    # and write the table into README.md

A benchmark, not a test: it always exits 0. Needs ``transformers``; the peer column needs
``torch-pruning`` (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SHAPES = {
    "qwen3-8b-meta": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, device="meta"),
    "qwen3-small": dict(vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                        num_attention_heads=16, num_key_value_heads=4, head_dim=64, device="cpu"),
}

_CHILD = r"""
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
import torch, transformers
tool, shape = sys.argv[1], json.loads(sys.argv[2])
device = shape.pop("device")
cfg = transformers.Qwen3Config(**shape, max_position_embeddings=4096, tie_word_embeddings=False, use_cache=False)
torch.manual_seed(0)
with torch.device(device):
    model = transformers.Qwen3ForCausalLM(cfg).eval()
ids = torch.zeros(1, 16, dtype=torch.long, device=device)
out = {}
try:
    t = time.perf_counter()
    if tool == "surgery":
        import surgery
        graph = surgery.trace(model, ids)
        prunable = [g for g in graph.groups if g.prunable]
        out["seconds"] = time.perf_counter() - t
        out["groups"] = len(prunable)
        producers = lambda g, part: any(part in p for p in g.producers or g.modules[:1])
        out["kinds"] = {"kv_heads": sum(producers(g, "self_attn.q_proj") for g in prunable),
                        "mlp": sum(producers(g, "mlp.gate_proj") for g in prunable),
                        "hidden": sum(g.size == shape["hidden_size"] and bool(g.cross_channel) for g in prunable)}
        t = time.perf_counter()
        plan = surgery.plan(model, ids, "random", 0.3, policy="uniform")
        out["plan_seconds"] = time.perf_counter() - t
        out["planned"] = len(plan.groups)
    else:
        import torch_pruning as tp
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=ids)
        groups = list(dg.get_all_groups())
        out["seconds"] = time.perf_counter() - t
        out["groups"] = len(groups)
except Exception as exc:
    out["error"] = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
out["rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1e9 if sys.platform == "darwin" else 1e6)  # bytes / KiB
print("RESULT " + json.dumps(out))
"""


def _measure(tool: str, shape: dict, timeout: float) -> dict:
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, tool, json.dumps(shape)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail[:120]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=sorted(SHAPES), nargs="*")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--readme", action="store_true", help="write the table into README.md (section llm-scale)")
    args = ap.parse_args()
    try:
        import torch_pruning  # noqa: F401
        tools = ("surgery", "torch-pruning")
    except ImportError:
        print("torch_pruning is not installed (pip install torch-pruning): measuring surgery only.")
        tools = ("surgery",)
    rows = ["| model | tool | trace + groups | peak RSS | prunable groups | notes |", "|---|---|---|---|---|---|"]
    print("\n".join(rows))
    for name in args.only or SHAPES:
        results = {tool: _measure(tool, dict(SHAPES[name]), args.timeout) for tool in tools}
        for tool, r in results.items():
            if "error" in r:
                rows.append(f"| {name} | {tool} | failed | {r.get('rss_gb', 0):.2f} GB | — | {r['error']} |")
                print(rows[-1], flush=True)
                continue
            notes = ""
            if tool == "surgery":
                notes = ", ".join(f"{k} {v}" for k, v in r["kinds"].items())
                notes += f"; random uniform plan {r['plan_seconds']:.1f} s, {r['planned']} groups"
            else:
                s = results.get("surgery", {})
                if "seconds" in s:
                    notes = f"surgery / peer: time {s['seconds'] / r['seconds']:.2f}x, peak RSS {s['rss_gb'] / r['rss_gb']:.2f}x"
            rows.append(f"| {name} | {tool} | {r['seconds']:.1f} s | {r['rss_gb']:.2f} GB | {r['groups']} | {notes} |")
            print(rows[-1], flush=True)
    if args.readme:
        import platform

        import torch

        from readme_section import replace_section

        head = (f"`python bench/llm_scale.py --readme`, {platform.machine()} CPU ({torch.get_num_threads()} threads), "
                f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; each cell a fresh process.")
        replace_section("llm-scale", "\n".join([head, "", *rows]))


if __name__ == "__main__":
    main()
