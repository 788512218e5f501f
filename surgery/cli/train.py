"""surgery train: training methods that prune (network slimming)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import SurgeryError
from ._common import BatchSize, Data, Debug, InputShape, Kwargs, ModelArg, Trust, Weights, _check_output, _fmt, _load, _out, _run, app
from .finetune import (
    Epochs, LabelSmoothing, Lr, Nesterov, Optimizer, Schedule, Seed, ValSplit, Warmup, WeightDecay, is_rank0, save_model,
    train_config,
)

TRAIN_METHODS = ("slimming",)


@app.command()
def train(
    model: ModelArg,
    method: Annotated[str, typer.Option("--method", "-m", help="Training method: slimming.")] = "slimming",
    data: Data = None, epochs: Epochs = None,
    sparsity: Annotated[float, typer.Option("--sparsity", "-s", help="L1 strength s on BN gammas (1e-4 VGG, 1e-5 ResNet).")] = 1e-4,
    ratio: Annotated[float, typer.Option("--ratio", "-r", help="Fraction of the prunable channels removed (global |gamma| ranking).")] = 0.5,
    target_macs: Annotated[Optional[float], typer.Option("--target-macs", help="Keep this fraction of the MACs instead.")] = None,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", help="Fine-tuning epochs after pruning.")] = 0,
    lr: Lr = 0.1, optimizer: Optimizer = "sgd", nesterov: Nesterov = False, schedule: Schedule = "cosine",
    warmup: Warmup = 0.0, weight_decay: WeightDecay = 1e-4, label_smoothing: LabelSmoothing = 0.0,
    val_split: ValSplit = 0.2, seed: Seed = 0, batch_size: BatchSize = 64,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the pruned, fine-tuned model here.")] = None,
    input_shape: InputShape = None, trust: Trust = False, weights: Weights = None, kwargs: Kwargs = None, debug: Debug = False,
) -> None:
    """Train MODEL with a method that prunes (slimming: sparsity training, |gamma| pruning, fine-tuning)."""

    def work():
        from surgery.calibration import load_data
        from surgery.plan import check_ratio
        from surgery.train import slimming

        if method not in TRAIN_METHODS:
            raise SurgeryError(f"unknown training method {method!r}; known: {', '.join(TRAIN_METHODS)}")
        cfg = train_config(epochs=epochs, lr=lr, optimizer=optimizer, nesterov=nesterov, schedule=schedule, warmup=warmup,
                           weight_decay=weight_decay, label_smoothing=label_smoothing, batch_size=batch_size, seed=seed)
        if finetune_epochs < 0:
            raise SurgeryError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
        check_ratio(ratio)
        _check_output(out, model, "output")
        if data is None:
            raise SurgeryError("training needs --data (digits, an image folder, or an .npz/.pt file with x and y)")
        net, x, source = _load(model, trust, weights, input_shape, kwargs)
        xs, ys = load_data(data, tuple(x.shape))
        if ys is None:
            raise SurgeryError(f"data {data} has no labels (y); training needs them")
        pruned, rep = slimming(net, x, (xs, ys), sparsity=sparsity, ratio=ratio, target_macs=target_macs, epochs=epochs,
                               finetune_epochs=finetune_epochs, config=cfg, val_split=val_split, seed=seed)
        if not is_rank0():
            return
        if out is not None:
            save_model(pruned, out, x, {"source": source, "method": "slimming", "plan": rep["plan"].to_dict(),
                                        "slimming": {"sparsity": sparsity, "ratio": ratio, "target_macs": target_macs,
                                                     "epochs": epochs, "finetune_epochs": finetune_epochs,
                                                     "accuracy": rep["accuracy"]}})
        _print(source, rep, ratio, sparsity, out)

    _run(debug, work)


def _print(source, rep, ratio, sparsity, out) -> None:
    table = Table(title=f"{escape(source)}: network slimming, s={sparsity:g}, ratio {ratio:g}")
    for col in ("", "sparse-trained", "pruned", "fine-tuned"):
        table.add_column(col, justify="right")
    a, p, m = rep["accuracy"], rep["params"], rep["macs"]
    table.add_row("accuracy", f"{a['sparse']:.4f}", f"{a['pruned']:.4f}", f"{a['finetuned']:.4f}")
    table.add_row("params", _fmt(p["before"]), _fmt(p["after"]), _fmt(p["after"]))
    table.add_row("MACs", _fmt(m["before"]), _fmt(m["after"]), _fmt(m["after"]))
    _out.print(table)
    _out.print(f"{rep['removed']} channels removed across {len(rep['norms'])} norm layers")
    _out.print(f"model written to {escape(str(out))}" if out is not None else "no --out given: nothing written")
