"""Full-size zoo sweep: every torchvision classification model at its native input size.

For each model: trace + plan (l1, ratio 0.5, cross-channel groups skipped), apply in both modes,
and report pruned-vs-masked relative error, parameter and MAC reduction and the time taken.
CI runs the same check at small input sizes (tests/test_torchvision_zoo.py); this is the long run.

    python bench/zoo_sweep.py                 # all models at their native size
    python bench/zoo_sweep.py resnet50 vit_b_16
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch
import torchvision

import surgery


def native(name: str) -> tuple[dict, int]:
    if name == "inception_v3":
        return {"aux_logits": False, "init_weights": False}, 299
    if name == "googlenet":
        return {"aux_logits": False, "init_weights": False}, 224
    return {}, 224


def run(name: str) -> str:
    kwargs, size = native(name)
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() and not p.abs().sum():
                p.normal_(0, 0.02)
    x = torch.randn(1, 3, size, size)
    t0 = time.perf_counter()
    plan = surgery.plan(model, x, method="l1", ratio=0.5, skip_cross_channel=True)
    pruned = surgery.apply(model, plan)
    masked = surgery.apply(model, plan, mode="mask")
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        y1, y2 = pruned(x), masked(x)
    rel = float((y1 - y2).norm() / y2.norm().clamp_min(1e-12))
    before, after = surgery.stats(model, x), surgery.stats(pruned, x)
    ok = "ok" if rel < 1e-4 and y1.shape == y2.shape and after.params < before.params else "FAIL"
    del model, pruned, masked
    gc.collect()
    return (f"| {name} | {ok} | {rel:.1e} | {before.params / 1e6:.2f} -> {after.params / 1e6:.2f} M "
            f"| {before.macs / 1e9:.2f} -> {after.macs / 1e9:.2f} G | {elapsed:.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*")
    args = ap.parse_args(argv)
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    print("| model | result | pruned vs masked | params | MACs | plan+apply s |")
    print("|---|---|---|---|---|---|")
    failures = 0
    for name in names:
        try:
            line = run(name)
        except Exception as exc:  # report and continue: a sweep shows every model
            line = f"| {name} | ERROR | {type(exc).__name__}: {str(exc).splitlines()[0][:120]} | | | |"
        failures += "ok" not in line.split("|")[2]
        print(line, flush=True)
    print(f"\n{len(names) - failures}/{len(names)} models ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
