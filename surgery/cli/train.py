"""surgery train: training methods that prune (network slimming, C-SGD, stripe-wise pruning, Pruning
from Scratch)."""

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

TRAIN_METHODS = ("slimming", "csgd", "swp", "from-scratch")


@app.command()
def train(
    model: ModelArg,
    method: Annotated[str, typer.Option("--method", "-m", help="Training method: slimming, csgd, swp or from-scratch.")] = "slimming",
    data: Data = None, epochs: Epochs = None,
    sparsity: Annotated[float, typer.Option("--sparsity", "-s", help="L1 strength s on BN gammas (1e-4 VGG, 1e-5 ResNet).")] = 1e-4,
    ratio: Annotated[float, typer.Option("--ratio", "-r", help="Fraction of the prunable channels removed (global |gamma| ranking).")] = 0.5,
    target_macs: Annotated[Optional[float], typer.Option("--target-macs", help="Keep this fraction of the MACs instead (swp: the threshold is raised after training to meet it).")] = None,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", help="Fine-tuning epochs after pruning.")] = 0,
    eps: Annotated[float, typer.Option("--eps", help="csgd: centripetal strength epsilon (3e-3 CIFAR, 0.05 ImageNet).")] = 3e-3,
    clusters: Annotated[str, typer.Option("--clusters", help="csgd: kmeans or even.")] = "kmeans",
    alpha: Annotated[float, typer.Option("--alpha", help="swp: L1 strength on the filter skeletons.")] = 1e-5,
    delta: Annotated[float, typer.Option("--delta", help="swp: threshold below which a stripe dies.")] = 0.01,
    gate_epochs: Annotated[int, typer.Option("--gate-epochs", help="from-scratch: epochs of gate learning.")] = 10,
    budget_train: Annotated[bool, typer.Option("--budget-train", help="from-scratch: scale the epochs by 1/(MACs kept) (Scratch-B).")] = False,
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
        from surgery.train import slimming, train_csgd, train_from_scratch, train_swp

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
        if method == "slimming":
            pruned, rep = slimming(net, x, (xs, ys), sparsity=sparsity, ratio=ratio, target_macs=target_macs, epochs=epochs,
                                   finetune_epochs=finetune_epochs, config=cfg, val_split=val_split, seed=seed)
            settings = {"sparsity": sparsity, "ratio": ratio, "target_macs": target_macs}
        elif method == "csgd":
            if clusters not in ("kmeans", "even"):
                raise SurgeryError(f"--clusters must be kmeans or even, got {clusters!r}")
            pruned, rep = train_csgd(net, x, (xs, ys), ratio=ratio, eps=eps, clusters=clusters, epochs=epochs,
                                     finetune_epochs=finetune_epochs, config=cfg, val_split=val_split, seed=seed)
            settings = {"ratio": ratio, "eps": eps, "clusters": clusters}
        elif method == "swp":
            pruned, rep = train_swp(net, x, (xs, ys), alpha=alpha, delta=delta, epochs=epochs, config=cfg,
                                    finetune_epochs=finetune_epochs, val_split=val_split, seed=seed,
                                    target_macs=target_macs)
            settings = {"alpha": alpha, "delta": delta, "target_macs": target_macs, "threshold": rep["threshold"]}
        else:
            pruned, rep = train_from_scratch(net, x, (xs, ys), target_macs=target_macs or 0.5, gate_epochs=gate_epochs,
                                             epochs=epochs, budget_train=budget_train, config=cfg, val_split=val_split,
                                             seed=seed)
            settings = {"target_macs": target_macs or 0.5, "gate_epochs": gate_epochs, "budget_train": budget_train}
        if not is_rank0():
            return
        if out is not None:
            meta = {"source": source, "method": method, method: {**settings, "epochs": epochs,
                                                                   "finetune_epochs": finetune_epochs, "accuracy": rep["accuracy"]}}
            if "plan" in rep:
                meta["plan"] = rep["plan"].to_dict()
            save_model(pruned, out, x, meta)
        _print(source, method, rep, settings, out)

    _run(debug, work)


def _print(source, method, rep, settings, out) -> None:
    what = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())
    table = Table(title=f"{escape(source)}: {method}, {escape(what)}")
    stages = list(rep["accuracy"])
    for col in ("", *stages):
        table.add_column(col, justify="right")
    table.add_row("accuracy", *(f"{rep['accuracy'][k]:.4f}" for k in stages))
    _out.print(table)
    p, m = rep["params"], rep["macs"]
    _out.print(f"params {_fmt(p['before'])} -> {_fmt(p['after'])}, MACs {_fmt(m['before'])} -> {_fmt(m['after'])}"
               + (" (counted by stripes)" if "stripes" in rep else ""))
    if "removed" in rep:
        _out.print(f"{rep['removed']} channels removed across {len(rep['norms'])} norm layers")
    if "stripes" in rep:
        live = sum(a for a, _ in rep["stripes"].values())
        total = sum(b for _, b in rep["stripes"].values())
        _out.print(f"{live} of {total} stripes alive in {len(rep['stripes'])} convs; "
                   f"{rep['dead_channels']} filters with no live stripe removed as channels")
    _out.print(f"model written to {escape(str(out))}" if out is not None else "no --out given: nothing written")
