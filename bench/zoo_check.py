"""One zoo model, checked in its own process: ``python bench/zoo_check.py '<spec json>'``.

Builds the model (``zoo_models.build``), traces, plans ``group-l1`` at ratio 0.5 with cross-channel
groups skipped, applies in both modes and compares pruned with masked, as
``tests/helpers.check_pruned_equals_masked`` does, but records numbers instead of asserting. The
result is one JSON line on stdout after ``RESULT:``; the parent (``zoo_sweep.py``) sets the time and
memory limits. The row names the pruned model's class (``output``, ``own_class``) and, for a
``GraphModule``, the reason the library gave (``output_reason``). The pruned model is dropped before
the masked one is made, so a large model never has both copies in memory at once.

Status: ``exact`` (every invariant holds), ``untraceable`` (a TraceError with its reason),
``nothing prunable`` (no group left to prune), ``mismatch`` (it ran, but an invariant does not hold:
pruned != masked, output shape changed, no fewer parameters, or the pruned model does not trace
again), ``crash`` (any other exception), ``out of memory`` (an allocation failed under the
parent's memory cap), ``no input`` (the model itself runs on no input tried).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import zoo_models  # noqa: E402

import surgery  # noqa: E402
from surgery.coverage import coverage  # noqa: E402
from surgery.module_tree import output_tensors  # noqa: E402
from surgery.errors import SurgeryError, TraceError  # noqa: E402
from surgery.pipeline import run  # noqa: E402
from surgery.rewrite import apply_to_graph  # noqa: E402

TOL = 1e-4




def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _out_of_memory(exc: BaseException | None) -> bool:
    """The exception, or one it was raised from, is an allocation failure (the parent's memory cap)."""
    while exc is not None:
        if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _where(exc: BaseException) -> str:
    """file:line function of the innermost frame inside surgery/ (where a crash surfaced)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}surgery{os.sep}" in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename.split(os.sep + 'surgery' + os.sep, 1)[1]}:{f.lineno} {f.name}"


def _graph_facts(graph, row: dict) -> None:
    row["frontend"] = graph.frontend
    row["groups"] = len(graph.groups)
    row["prunable_groups"] = sum(g.prunable for g in graph.groups)
    row["cross_channel_groups"] = sum(bool(g.prunable and g.cross_channel) for g in graph.groups)
    row["not_rewritable"] = [g.reason_detail[:200] for g in graph.groups
                             if g.reason is not None and g.reason.name == "NOT_REWRITABLE"][:5]
    cov = coverage(graph)
    row["params"], row["share"] = cov.params, round(cov.share, 4)
    row["blockers"] = [dict(b.__dict__) for b in cov.blockers[:5]]


def check(spec: dict) -> dict:
    row: dict = {**spec, "status": None, "surgery_dir": os.path.dirname(os.path.dirname(surgery.__file__))}
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    try:
        model, inputs, how = zoo_models.build(spec)
    except Exception as exc:
        row.update(status="no input", error=_line(exc), seconds=round(time.perf_counter() - t0, 1))
        return row
    row.update(how)
    row["build_seconds"] = round(time.perf_counter() - t0, 1)
    t1 = time.perf_counter()
    stage = "trace+plan+apply"
    try:
        try:
            result = run(model, inputs, "group-l1", 0.5, skip_cross_channel=True)
        except TraceError as exc:
            row.update(status="out of memory" if _out_of_memory(exc) else "untraceable", error=_line(exc))
            return row
        row["traced"] = True
        _graph_facts(result.graph, row)
        plan, pruned = result.plan, result.model
        row["planned_groups"] = len(plan.groups)
        if not plan.groups:
            row["status"] = "nothing prunable"
            return row
        stage = "forward"
        with torch.no_grad():
            y0, y1 = output_tensors(model(*inputs)), output_tensors(pruned(*inputs))
        before = sum(p.numel() for p in model.parameters())
        after = sum(p.numel() for p in pruned.parameters())
        row["params_after"] = after
        row["output"] = type(pruned).__name__
        row["own_class"] = type(pruned) is type(model)
        if not row["own_class"]:  # the GraphModule result says why the model's own class could not be kept
            row["output_reason"] = (getattr(pruned, "meta", {}).get("surgery_output") or {}).get("reason", "")[:300]
        problems = []
        stage = "retrace"
        try:
            surgery.trace(pruned, inputs)
        except SurgeryError as exc:
            problems.append(f"the pruned model does not trace again: {_line(exc)}")
        del pruned  # the masked model is a full-size copy: never both in memory (large models, memory cap)
        result.model = None
        gc.collect()
        stage = "mask"
        masked = apply_to_graph(result.graph, plan, mode="mask")
        stage = "forward"
        with torch.no_grad():
            y2 = output_tensors(masked(*inputs))
        del masked
        rel = 0.0
        for a, b, c in zip(y0, y1, y2, strict=True):
            if b.shape != a.shape:
                problems.append(f"output shape {tuple(a.shape)} -> {tuple(b.shape)}")
            elif c.shape == b.shape:
                rel = max(rel, float((b - c).norm() / c.norm().clamp_min(1e-12)))
        row["rel_err"] = rel
        if rel >= TOL:
            problems.append(f"pruned != masked: rel err {rel:.1e}")
        if after >= before:
            problems.append(f"no fewer parameters ({before} -> {after})")
        row["status"] = "mismatch" if problems else "exact"
        if problems:
            row["error"] = "; ".join(problems)
    except Exception as exc:  # a crash: keep where it surfaced and the traceback tail for the write-up
        row.update(status="out of memory" if _out_of_memory(exc) else "crash", stage=stage, error=_line(exc), where=_where(exc),
                   traceback=traceback.format_exc().splitlines()[-24:])
        if "traced" not in row:  # learn what the graph looks like, if the trace itself works
            try:
                _graph_facts(surgery.trace(model, inputs), row)
                row["traced"] = True
            except Exception as exc2:
                row["trace_error"] = _line(exc2)
    finally:
        row["seconds"] = round(time.perf_counter() - t1, 1)
    return row


if __name__ == "__main__":
    row = check(json.loads(sys.argv[1]))
    print("RESULT:" + json.dumps(row, default=str), flush=True)
