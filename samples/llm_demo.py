"""Prune a small Llama trained on the standard library's documentation, and compare criteria.

A ~1M-parameter ``LlamaForCausalLM`` (random init, byte-level BPE of 512 tokens trained on the text)
is trained on ``pydoc_data.topics`` for about two minutes on one CPU thread. Then, for each method,
30% of the attention heads and 30% of the MLP neurons of every layer are removed (the local policy:
every group loses 30% by its own scores, so every layer keeps the same widths and the result is still
a stock Llama that ``save_pretrained`` describes; the hidden size, under RMSNorm, stays), the pruned model is fine-tuned briefly, and perplexity on the held-out 10% is measured
before pruning, after pruning and after fine-tuning.

    .venv/bin/python samples/llm_demo.py              # print the table
    .venv/bin/python samples/llm_demo.py --readme     # and write it into README.md (section llm-demo)
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import surgery  # noqa: E402
from surgery.calibration.text import text_blocks  # noqa: E402
from surgery.hf import perplexity  # noqa: E402

VOCAB, SEQ = 512, 64
METHODS = ("random", "l1", "wanda-structured", "flap", "llm-taylor")


def build(seed: int = 0):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=140, intermediate_size=280, num_hidden_layers=3,
                                   num_attention_heads=10, num_key_value_heads=10, head_dim=14,
                                   max_position_embeddings=SEQ, tie_word_embeddings=True, use_cache=False,
                                   attention_bias=True, mlp_bias=True)  # biases: FLAP compensates into them; 7 of 10 heads divide 140 (LlamaConfig checks hidden % heads)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def train(model, blocks: torch.Tensor, *, seconds: float | None = None, steps: int | None = None, lr: float = 3e-3,
          batch: int = 16, seed: int = 0) -> int:
    """AdamW on random blocks for a time budget or a step count; returns the steps taken."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    start, n = time.perf_counter(), 0
    while (steps is None or n < steps) and (seconds is None or time.perf_counter() - start < seconds):
        ids = blocks[torch.randint(0, len(blocks), (batch,), generator=gen)]
        loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += 1
    model.eval()
    return n


def widths(model) -> tuple[int, int]:
    layer = model.model.layers[0]
    return layer.self_attn.q_proj.out_features // layer.self_attn.head_dim, layer.mlp.gate_proj.out_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-seconds", type=float, default=120.0)
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--eval-windows", type=int, default=96)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--readme", action="store_true", help="write the table into README.md (section llm-demo)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    def ppl(m) -> float:
        return perplexity(m, "pydoc", seq_len=SEQ, max_windows=args.eval_windows, batch_size=16)

    blocks = text_blocks("pydoc", seq_len=SEQ, vocab_size=VOCAB)  # the training split, BPE trained on it
    model = build()
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    steps = train(model, blocks, seconds=args.train_seconds)
    base_wall = time.perf_counter() - t0
    base = ppl(model)
    heads, mlp = widths(model)
    print(f"base: {n_params:,} params, {steps} steps in {base_wall:.0f} s, perplexity {base:.2f}")
    x = blocks[:8]
    rows = [("base", base, None, n_params, heads, mlp, base_wall)]
    for method in args.methods.split(","):
        t = time.perf_counter()
        pruned = surgery.prune(model, x, method=method, ratio=args.ratio, data="pydoc",
                               skip_cross_channel=True, calib_batches=8)  # the hidden size (under RMSNorm) stays
        with tempfile.TemporaryDirectory() as d:  # a stock Llama again: save_pretrained describes it
            pruned.save_pretrained(d)
        after = ppl(pruned)
        train(pruned, blocks, steps=args.finetune_steps, lr=1e-3, seed=1)
        tuned = ppl(pruned)
        h, m = widths(pruned)
        assert pruned.config.hidden_size == model.config.hidden_size
        rows.append((method, after, tuned, sum(p.numel() for p in pruned.parameters()), h, m, time.perf_counter() - t))
        print(f"{method}: after pruning {after:.2f}, after fine-tuning {tuned:.2f}, heads {h}, MLP {m}")
    after = {r[0]: r[1] for r in rows}
    aware = [m for m in ("wanda-structured", "flap") if m in after]
    if "random" in after and aware:
        beaten = all(after[m] < after["random"] for m in aware)
        verdict = "beat" if beaten else "DO NOT beat"
        line = f"activation-aware criteria ({', '.join(aware)}) {verdict} random after pruning"
        print(line)
        if not beaten:
            raise SystemExit(f"error: {line}")  # the demo's defining check; the README is not written
    table = _table(rows, args, steps)
    print(table)
    if args.readme:
        from readme_section import replace_section

        replace_section("llm-demo", table)


def _table(rows, args, steps) -> str:
    head = (f"Llama (3 layers, hidden 140, 10 heads of 14, MLP 280, BPE vocabulary {VOCAB}) trained {steps} steps "
            f"(~{args.train_seconds:.0f} s) on `pydoc_data.topics`; perplexity on the held-out 10% "
            f"({args.eval_windows} windows of {SEQ}); {args.ratio:.0%} of heads and MLP neurons removed in every layer "
            f"by each layer's own scores, fine-tuning {args.finetune_steps} steps; {platform.machine()} CPU, 1 thread, "
            f"torch {torch.__version__}, {datetime.date.today()}.\n\n")
    lines = ["| method | ppl after pruning | ppl after fine-tuning | params | heads / layer | MLP / layer | wall s |",
             "|---|---|---|---|---|---|---|"]
    for name, after, tuned, n, h, m, wall in rows:
        a = f"{after:.3f}"
        f = "-" if tuned is None else f"{tuned:.3f}"
        lines.append(f"| {name} | {a} | {f} | {n:,} | {h} | {m} | {wall:.0f} |")
    return head + "\n".join(lines)


if __name__ == "__main__":
    main()
