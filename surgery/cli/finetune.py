"""surgery finetune (and the training options `surgery prune --finetune-epochs` and `surgery train` share)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..errors import SurgeryError
from ._common import (
    BatchSize, Data, Debug, InputShape, Kwargs, ModelArg, Trust, Weights, _check_output, _load, _out, _run, app,
)

Epochs = Annotated[Optional[int], typer.Option("--epochs", "-e", help="Training epochs.")]
Lr = Annotated[float, typer.Option("--lr", help="Peak learning rate.")]
Optimizer = Annotated[str, typer.Option("--optimizer", help="sgd (momentum 0.9) or adam.")]
Nesterov = Annotated[bool, typer.Option("--nesterov", help="Nesterov momentum (sgd).")]
Schedule = Annotated[str, typer.Option("--schedule", help="cosine, multistep (x0.1 at 50% and 75%) or constant.")]
Warmup = Annotated[float, typer.Option("--warmup", help="Linear warmup, in epochs.")]
WeightDecay = Annotated[float, typer.Option("--weight-decay", help="Weight decay (not on biases and norm layers).")]
LabelSmoothing = Annotated[float, typer.Option("--label-smoothing", help="Label smoothing of the cross-entropy.")]
ValSplit = Annotated[float, typer.Option("--val-split", help="Fraction of --data held out for validation (seeded).")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the split and the data order.")]
CheckpointDir = Annotated[Optional[Path], typer.Option("--checkpoint-dir", help="Write trainer checkpoints last.pt / best.pt here.")]
Resume = Annotated[Optional[Path], typer.Option("--resume", help="Continue from a trainer checkpoint (last.pt).")]


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def train_config(*, epochs, lr, optimizer, nesterov, schedule, warmup, weight_decay, label_smoothing, batch_size, seed,
                 checkpoint_dir=None, resume=None):
    from surgery.train import TrainConfig

    if epochs is None:
        raise SurgeryError("--epochs is required (a positive integer)")
    if isinstance(epochs, bool) or epochs < 1:
        raise SurgeryError(f"--epochs must be a positive integer, got {epochs}")
    if resume is not None and not resume.is_file():
        raise SurgeryError(f"--resume {resume}: no such file")
    return TrainConfig(epochs=epochs, lr=lr, optimizer=optimizer, nesterov=nesterov, schedule=schedule,
                       warmup_epochs=warmup, weight_decay=weight_decay, label_smoothing=label_smoothing,
                       batch_size=batch_size, seed=seed, checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
                       resume=str(resume) if resume else None)


def labelled_data(data: str | None, x, val_split: float, seed: int):
    """``--data`` as ``(train, val)``; ``val`` is None when ``--val-split 0``."""
    from surgery.calibration import load_data
    from surgery.train import split

    if data is None:
        raise SurgeryError("training needs --data (digits, an image folder, or an .npz/.pt file with x and y)")
    xs, ys = load_data(data, tuple(x.shape))
    if ys is None:
        raise SurgeryError(f"data {data} has no labels (y); training needs them")
    return split(xs, ys, val_split, seed)


def save_model(net, out: Path, x, meta: dict, format: str = "dense") -> None:
    from .prune import _save_result

    _save_result(net, out, format, {**meta, "input_shape": list(x.shape)}, x)


def _old_meta(net) -> dict:
    from surgery.checkpoint import metadata_of

    return dict(metadata_of(net))


@app.command()
def finetune(
    model: ModelArg, data: Data = None, epochs: Epochs = None, lr: Lr = 0.01, optimizer: Optimizer = "sgd",
    nesterov: Nesterov = False, schedule: Schedule = "cosine", warmup: Warmup = 0.0, weight_decay: WeightDecay = 1e-4,
    label_smoothing: LabelSmoothing = 0.0, val_split: ValSplit = 0.2, seed: Seed = 0, batch_size: BatchSize = 64,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the fine-tuned model here.")] = None,
    checkpoint_dir: CheckpointDir = None, resume: Resume = None,
    input_shape: InputShape = None, trust: Trust = False, weights: Weights = None, kwargs: Kwargs = None, debug: Debug = False,
) -> None:
    """Fine-tune MODEL on --data and print the validation accuracy before and after; --out saves it."""

    def work():
        from surgery.train import evaluate, fit

        cfg = train_config(epochs=epochs, lr=lr, optimizer=optimizer, nesterov=nesterov, schedule=schedule, warmup=warmup,
                           weight_decay=weight_decay, label_smoothing=label_smoothing, batch_size=batch_size, seed=seed,
                           checkpoint_dir=checkpoint_dir, resume=resume)
        _check_output(out, model, "output")
        net, x, source = _load(model, trust, weights, input_shape, kwargs)
        train_set, val_set = labelled_data(data, x, val_split, seed)
        probe = val_set or train_set
        before = evaluate(net, probe)
        from surgery.sparsity import UNSTRUCTURED
        from surgery.train import Hooks
        from surgery.train.masks import unstructured_hooks

        # an unstructured checkpoint keeps its zeros: masked gradients, weights re-masked after each step
        unstructured = _old_meta(net).get("method") == UNSTRUCTURED
        hist = fit(net, train_set, val_set, cfg, unstructured_hooks(net, from_zeros=True) if unstructured else Hooks())
        after = evaluate(net, probe)
        if not is_rank0():
            return
        meta = {**_old_meta(net), "source": source,
                "finetune": {"data": data, "epochs": epochs, "lr": lr, "optimizer": optimizer, "schedule": schedule,
                             "accuracy_before": before[0], "accuracy_after": after[0], "best_val_acc": hist.best_acc}}
        if out is not None:
            save_model(net, out, x, meta, "csr" if unstructured else "dense")
        where = "validation" if val_set is not None else "training"
        _out.print(f"{escape(source)}: {where} accuracy {before[0]:.4f} -> {after[0]:.4f} (loss {before[1]:.4f} -> {after[1]:.4f})")
        _out.print(f"fine-tuned model written to {escape(str(out))}" if out is not None else "no --out given: nothing written")

    _run(debug, work)


__all__ = ["finetune", "train_config", "labelled_data", "save_model", "is_rank0"]
