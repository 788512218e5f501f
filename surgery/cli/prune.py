"""surgery prune."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import torch
import torch.fx
import typer
from rich.markup import escape
from rich.table import Table

from .. import checkpoint
from .._files import atomic_write
from ..errors import SurgeryError
from ._common import (
    BatchSize, CalibBatches, Data, Debug, InputShape, Kwargs, Leaf, MethodOpt, ModelArg, Trust, Weights,
    _calibration, _check_output, _fmt, _layer_ratios, _load, _method_options, _out, _progress, _run, app,
)

SCHEDULES = ("oneshot", "layerwise")


@app.command()
def prune(
    model: ModelArg,
    method: Annotated[str, typer.Option("--method", "-m", help="Scoring method (see `surgery methods`).")] = "l1",
    ratio: Annotated[float, typer.Option("--ratio", "-r", help="Fraction of channels removed per group, in [0, 1).")] = 0.5,
    global_: Annotated[bool, typer.Option("--global", help="Rank channels across all groups.")] = False,
    layer_ratio: Annotated[Optional[list[str]], typer.Option("--layer-ratio", help="NAME=R ratio for modules matching a pattern (repeatable); @FILE reads NAME=R lines.")] = None,
    target_macs: Annotated[Optional[float], typer.Option("--target-macs", help="Keep this fraction of the MACs (bisection over the global ranking).")] = None,
    round_to: Annotated[int, typer.Option("--round-to", help="Keep a multiple of N channels in every group of at least N.")] = 1,
    option: MethodOpt = None, data: Data = None, calib_batches: CalibBatches = None, batch_size: BatchSize = 32,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the pruned model here.")] = None,
    format: Annotated[str, typer.Option("--format", help="Checkpoint format: dense or csr.")] = "dense",
    sparsity: Annotated[Optional[float], typer.Option("--sparsity", help="magnitude-unstructured: share of Linear/conv weights set to zero, in [0, 1).")] = None,
    scope: Annotated[str, typer.Option("--scope", help="magnitude-unstructured: global (one threshold) or layer (each weight tensor at --sparsity).")] = "global",
    plan_out: Annotated[Optional[Path], typer.Option("--plan-out", help="Write the plan (JSON) here.")] = None,
    plan_in: Annotated[Optional[Path], typer.Option("--plan", help="Apply this plan (JSON) instead of making one.")] = None,
    output: Annotated[str, typer.Option("--output", help="auto (the model's own class where its forward allows), module, or graph.")] = "auto",
    submodule: Annotated[Optional[str], typer.Option("--submodule", help="Prune only this submodule (e.g. backbone); the whole model is returned.")] = None,
    free_output: Annotated[Optional[list[str]], typer.Option("--free-output", help="Model outputs (module-name patterns) whose channels may shrink (repeatable).")] = None,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", help="After pruning, fine-tune this many epochs on --data (SGD, cosine, lr 0.01).")] = 0,
    schedule: Annotated[str, typer.Option("--schedule", help="oneshot, or layerwise: one group at a time in network order, each scored on the pruned model and fine-tuned --step-epochs; --finetune-epochs at the end.")] = "oneshot",
    step_epochs: Annotated[int, typer.Option("--step-epochs", help="layerwise: fine-tuning epochs after each group (needs labelled --data when > 0).")] = 1,
    input_shape: InputShape = None, trust: Trust = False, weights: Weights = None, kwargs: Kwargs = None, leaf: Leaf = None, debug: Debug = False,
) -> None:
    """Prune MODEL and print a before/after table; --out writes a dense checkpoint."""

    def work():
        from surgery.pipeline import run
        from surgery.plan import Plan
        from surgery.planner import split_options
        from surgery.sparsity import UNSTRUCTURED

        if method == UNSTRUCTURED or sparsity is not None:
            given = {"--global": global_, "--layer-ratio": layer_ratio, "--target-macs": target_macs is not None,
                     "--round-to": round_to != 1, "--option": option, "--calib-batches": calib_batches is not None,
                     "--plan": plan_in, "--plan-out": plan_out, "--submodule": submodule, "--free-output": free_output,
                     "--leaf": leaf, "--schedule": schedule != "oneshot"}
            return _prune_unstructured(model, method, sparsity, scope, [k for k, v in given.items() if v], data,
                                       batch_size, finetune_epochs, out, format, output, input_shape, trust, weights,
                                       kwargs)
        options = {}
        if plan_in is None:
            options = dict(_method_options(option), leaf_modules=tuple(leaf or ()), round_to=round_to,
                           layer_ratios=_layer_ratios(layer_ratio))
            if global_:
                options["policy"] = "global"
            if target_macs is not None:
                options["target_macs"] = target_macs
            if calib_batches is not None:
                options["calib_batches"] = calib_batches
            if submodule:
                options["submodule"] = submodule
            if free_output:
                options["free_outputs"] = tuple(free_output)
            from surgery.plan import check_ratio

            check_ratio(ratio)
            split_options(method, options)
        if format not in checkpoint.FORMATS:
            raise SurgeryError(f"unknown checkpoint format {format!r}; known formats: {', '.join(checkpoint.FORMATS)}")
        _check_output(out, model, "output")
        _check_output(plan_out, model, "plan")
        if finetune_epochs < 0 or (finetune_epochs > 0 and data is None):
            raise SurgeryError(f"--finetune-epochs needs --data and a count >= 0, got {finetune_epochs}")
        if schedule not in SCHEDULES:
            raise SurgeryError(f"unknown schedule {schedule!r}; known schedules: {', '.join(SCHEDULES)}")
        if schedule == "layerwise":
            return _layerwise(model, method, ratio, options, data, batch_size, finetune_epochs, step_epochs, out,
                              plan_in, plan_out, output, input_shape, trust, weights, kwargs, format)
        saved = None
        if plan_in is not None:
            try:
                saved = Plan.from_json(plan_in.read_text())
            except OSError as exc:
                raise SurgeryError(f"cannot read plan {plan_in}: {exc.strerror or exc}") from None
        with _progress() as step:
            step(f"loading {model}")
            net, x, source = _load(model, trust, weights, input_shape, kwargs)
            calib = _calibration(data, x, batch_size, calib_batches, net)
            result = run(net, saved.example_inputs() if saved else x, method, ratio, calib, plan=saved, measure=True,
                         output=output, progress=step, **options)
            p, pruned, before, after = result.plan, result.model, result.before, result.after
            tuned = _finetune(pruned, x, data, finetune_epochs, batch_size, step) if finetune_epochs > 0 else None
            meta = {"source": source, "method": p.method, "ratio": p.ratio, "policy": p.policy, "plan": p.to_dict(),
                    "input_shape": list(p.input_shapes[0]) if p.input_shapes else list(x.shape),
                    "stats": {"before": before.as_dict(), "after": after.as_dict()}}
            existed = out is not None and out.exists()
            step(f"writing {out}" if out is not None else "done")
            if out is not None:
                _save_result(pruned, out, format, meta, p.example_inputs())
        if plan_out is not None:
            try:
                atomic_write(plan_out, p.to_json(indent=1))
            except BaseException:
                if out is not None and not existed:
                    out.unlink(missing_ok=True)  # all outputs or none
                raise
        if tuned is not None:
            _out.print(f"validation accuracy: pruned {tuned[0]:.4f}, after {finetune_epochs} fine-tuning epoch(s) {tuned[1]:.4f}")
        _print_prune(source, p, before, after, out, plan_out)
        why = getattr(pruned, "meta", {}).get("surgery_output", {}).get("reason") if isinstance(pruned, torch.fx.GraphModule) else None
        _out.print(f"result: a GraphModule ({escape(why)})" if why else f"result: {escape(type(pruned).__name__)}")

    _run(debug, work)


def _layerwise(model, method, ratio, options, data, batch_size, final_epochs, step_epochs, out, plan_in, plan_out,
               output, input_shape, trust, weights, kwargs, format) -> None:
    """--schedule layerwise: ``surgery.train.recipes.prune_layerwise``, then the usual table and checkpoint."""
    from surgery.calibration import Calibration, load_data
    from surgery.stats import ModelStats
    from surgery.train import TrainConfig
    from surgery.train.recipes import prune_layerwise

    if plan_in is not None or plan_out is not None:
        raise SurgeryError("--schedule layerwise makes one plan per group: --plan and --plan-out need --schedule oneshot")
    if output != "auto":
        raise SurgeryError("--schedule layerwise keeps each step's default output: drop --output")
    if step_epochs < 0 or (step_epochs > 0 and data is None):
        raise SurgeryError(f"--step-epochs needs --data and a count >= 0, got {step_epochs}")
    with _progress() as step:
        step(f"loading {model}")
        net, x, source = _load(model, trust, weights, input_shape, kwargs)
        training = step_epochs > 0 or final_epochs > 0
        labelled = None
        if data is not None:
            xs, ys = load_data(data, tuple(x.shape))
            if training and ys is None:
                raise SurgeryError(f"data {data} has no labels (y); fine-tuning needs them")
            labelled = (xs, ys) if training else Calibration(xs if ys is None else (xs, ys), batch_size=batch_size)
        cfg = TrainConfig(lr=0.01, batch_size=batch_size, progress=False)
        pruned, rep = prune_layerwise(net, x, method, ratio, labelled, epochs_per_step=step_epochs,
                                      final_epochs=final_epochs, config=cfg, progress=step, **options)
        before = ModelStats(rep["params"]["before"], rep["macs"]["before"])
        after = ModelStats(rep["params"]["after"], rep["macs"]["after"])
        meta = {"source": source, "method": method, "ratio": ratio, "schedule": "layerwise", "steps": rep["steps"],
                "plans": [p.to_dict() for p in rep["plans"]], "input_shape": list(x.shape),
                "stats": {"before": before.as_dict(), "after": after.as_dict()}}
        step(f"writing {out}" if out is not None else "done")
        if out is not None:
            _save_result(pruned, out, format, meta, x)
    table = Table(title=f"{escape(source)}: {method}, ratio {ratio:g}, layer by layer")
    for col in ("step", "group", "channels", "kept", "accuracy"):
        table.add_column(col, justify="left" if col == "group" else "right")
    for k, s in enumerate(rep["steps"], 1):
        acc = f"{s['accuracy']:.4f}" if "accuracy" in s else "-"
        table.add_row(str(k), escape(s["group"]), str(s.get("size", "-")), str(s.get("kept", "whole")), acc)
    _out.print(table)
    if "accuracy" in rep:
        a = rep["accuracy"]
        _out.print(f"validation accuracy: before {a['before']:.4f}, after the steps {a['pruned']:.4f}, "
                   f"after {final_epochs} final epoch(s) {a['finetuned']:.4f}")
    _out.print(f"params {_fmt(before.params)} -> {_fmt(after.params)}, MACs {_fmt(before.macs)} -> {_fmt(after.macs)}")
    _out.print(f"pruned model written to {escape(str(out))}" if out is not None else "no --out given: nothing written")


def _finetune(net, x, data, epochs: int, batch_size: int, step, hooks=None) -> tuple[float, float]:
    """Fine-tune the pruned model in place (``surgery finetune``'s defaults); accuracy before and after."""
    from surgery.train import Hooks, TrainConfig, evaluate, fit

    from .finetune import labelled_data

    train_set, val_set = labelled_data(data, x, 0.2, 0)
    step(f"fine-tuning {epochs} epoch(s)")
    acc = evaluate(net, val_set)[0]
    fit(net, train_set, val_set, TrainConfig(epochs=epochs, lr=0.01, batch_size=batch_size, progress=False), hooks or Hooks())
    return acc, evaluate(net, val_set)[0]


def _save_result(model, out: Path, format: str, meta: dict, example_inputs) -> None:
    """A surgery checkpoint; a model that cannot be traced as a whole (a detector around a pruned
    backbone) is written as a whole-module pickle instead, which ``surgery`` loads back through its
    allow-list (its classes come from torch / torchvision)."""
    from surgery.errors import TraceError
    from surgery.hf import is_hf_model

    if is_hf_model(model) and not out.suffix:  # a Hugging Face model into a directory: save_pretrained
        tmp = out.with_name(f".{out.name}.tmp")
        model.save_pretrained(tmp)
        os.replace(tmp, out)  # _check_output refused an existing directory
        return
    try:
        checkpoint.save(model, out, format=format, metadata=meta, example_inputs=example_inputs)
    except TraceError:
        if isinstance(model, torch.fx.GraphModule) or format != "dense":
            raise
        atomic_write(out, lambda tmp: torch.save(model, tmp))
        _out.print("the whole model cannot be traced: written as a whole-module pickle (torch.save)")


def _print_prune(source, p, before, after, out, plan_out) -> None:
    table = Table(title=f"{escape(source)}: {p.method}, ratio {p.ratio:g}, {p.policy}")
    for col in ("", "before", "after", "kept"):
        table.add_column(col, justify="right" if col else "left")
    for name, a, b in (("params", before.params, after.params), ("MACs", before.macs, after.macs)):
        table.add_row(name, _fmt(a), _fmt(b), f"{100 * b / a:.1f}%" if a else "-")
    _out.print(table)
    groups = Table(title=f"{len(p.groups)} of {p.n_groups} groups pruned")
    for col in ("group", "label", "channels", "kept"):
        groups.add_column(col, justify="left" if col == "label" else "right")
    for g in p.groups:
        groups.add_row(str(g.id), escape(g.label), str(g.size), str(len(g.keep)))
    _out.print(groups)
    if p.notes:
        first = next(iter(p.notes.values()))
        _out.print(f"{len(p.notes)} prunable group(s) left whole by {escape(p.method)}, e.g.: {escape(first)}")
    if plan_out is not None:
        _out.print(f"plan written to {escape(str(plan_out))}")
    _out.print(f"pruned model written to {escape(str(out))}" if out is not None else "no --out given: nothing written")


def _prune_unstructured(model, method, sparsity, scope, channel_flags, data, batch_size, finetune_epochs, out, format,
                        output, input_shape, trust, weights, kwargs) -> None:
    """--method magnitude-unstructured: zero single weights (no channel plan); masks kept while fine-tuning."""
    from surgery.pipeline import run_unstructured
    from surgery.sparsity import UNSTRUCTURED, check_sparsity
    from surgery.stats import weight_sparsity

    if method != UNSTRUCTURED:
        raise SurgeryError(f"--sparsity applies to --method {UNSTRUCTURED} only; channel methods take --ratio")
    if sparsity is None:
        raise SurgeryError(f"--method {UNSTRUCTURED} needs --sparsity (the share of weights set to zero, e.g. 0.9)")
    if channel_flags:
        raise SurgeryError(f"{', '.join(channel_flags)} select channels and do not apply to --method {UNSTRUCTURED}")
    check_sparsity(sparsity, scope)
    if format not in checkpoint.FORMATS:
        raise SurgeryError(f"unknown checkpoint format {format!r}; known formats: {', '.join(checkpoint.FORMATS)}")
    _check_output(out, model, "output")
    if finetune_epochs < 0 or (finetune_epochs > 0 and data is None):
        raise SurgeryError(f"--finetune-epochs needs --data and a count >= 0, got {finetune_epochs}")
    with _progress() as step:
        step(f"loading {model}")
        net, x, source = _load(model, trust, weights, input_shape, kwargs)
        res = run_unstructured(net, x, sparsity, scope, output=output, measure=True, progress=step)
        tuned = None
        if finetune_epochs > 0:
            from surgery.train.masks import mask_hooks

            tuned = _finetune(res.model, x, data, finetune_epochs, batch_size, step, mask_hooks(res.masks))
        sp = weight_sparsity(res.model)
        meta = {"source": source, "method": UNSTRUCTURED, "sparsity": sparsity, "scope": scope,
                "input_shape": list(x.shape),
                "stats": {"before": res.before.as_dict(), "after": res.after.as_dict(),
                          "zeros": sp.zeros, "prunable": sp.prunable, "prunable_zeros": sp.prunable_zeros}}
        if out is not None:
            step(f"writing {out}")
            _save_result(res.model, out, format, meta, x)
    if tuned is not None:
        _out.print(f"validation accuracy: pruned {tuned[0]:.4f}, after {finetune_epochs} fine-tuning epoch(s) "
                   f"(masks kept) {tuned[1]:.4f}")
    table = Table(title=f"{escape(source)}: {UNSTRUCTURED}, sparsity {sparsity:g}, {scope}")
    for col in ("", "value"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("params", _fmt(res.after.params))
    table.add_row("zero Linear/conv weights", f"{sp.prunable_zeros:,} of {sp.prunable:,} ({sp.of_prunable:.2%})")
    table.add_row("zero parameters overall", f"{sp.zeros:,} of {sp.params:,} ({sp.overall:.2%})")
    if out is not None:
        table.add_row(f"file ({format})", _fmt(out.stat().st_size) + "B")
    _out.print(table)
    _out.print(f"pruned model written to {escape(str(out))}" if out is not None else "no --out given: nothing written")
