"""A small training loop: one function, ``fit``, readable top to bottom.

Runs unchanged under ``torchrun --nproc_per_node N``: when the launcher's environment is present it
joins the process group (gloo on CPU, nccl on GPU), wraps the model in DDP and shards each epoch with
a ``DistributedSampler``; only rank 0 evaluates, writes files and shows progress. BatchNorm uses
each process's own batch statistics (plain DDP; convert to ``SyncBatchNorm`` yourself on GPU). Checkpoints hold
state dicts and plain values only, and load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from .._files import atomic_write
from .config import Hooks, TrainConfig, TrainError, lr_factor, param_groups

__all__ = ["fit", "evaluate", "History", "load_state"]


@dataclass
class History:
    """Per-epoch records (``epoch``, ``train_loss``, ``train_acc``, ``lr``, ``val_loss``, ``val_acc``)."""

    epochs: list[dict] = field(default_factory=list)
    best_acc: float | None = None
    steps: int = 0

    @property
    def last(self) -> dict:
        return self.epochs[-1] if self.epochs else {}


def _dist_env() -> tuple[int, int, bool]:
    """(rank, world size, whether we started the process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), world, True
    return 0, 1, False


def _device(world: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 256) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``(x, y)``, in eval mode (mode restored)."""
    x, y = data
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    correct, loss = 0, 0.0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        out = model(xb.to(dev))
        yb = yb.to(dev)
        correct += int((out.argmax(1) == yb).sum())
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
    model.train(was)
    return correct / len(x), loss / len(x)


def load_state(path) -> dict:
    """A trainer checkpoint (``last.pt`` / ``best.pt``), read with ``weights_only=True``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainError(f"checkpoint {path} not found") from None
    except Exception as exc:
        raise TrainError(f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise TrainError(f"{path} is not a surgery trainer checkpoint (no model/epoch)")
    return state


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=False)
    if not (enabled and console.is_terminal):
        return None
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), console=console, transient=True)


def fit(model: nn.Module, train, val=None, config: TrainConfig = TrainConfig(), hooks: Hooks = Hooks()) -> History:
    """Train ``model`` in place on ``train = (x, y)``; evaluate on ``val`` each epoch; return the history.

    The model is left in eval mode on its original device.
    """
    if not isinstance(config, TrainConfig):
        raise TrainError(f"config must be a TrainConfig, got {type(config).__name__}")
    x, y = train
    if y is None or len(x) != len(y) or len(x) == 0:
        raise TrainError("training data must be a non-empty (x, y) pair with one label per sample")
    rank, world, started = _dist_env()
    try:
        return _fit(model, x, y, val, config, hooks, rank, world)
    finally:
        if started:
            dist.destroy_process_group()


def _fit(model, x, y, val, cfg: TrainConfig, hooks: Hooks, rank: int, world: int) -> History:
    if cfg.batch_size % world:
        raise TrainError(f"batch size {cfg.batch_size} is not divisible by the {world} processes")
    home = next(model.parameters()).device
    dev = _device(world)
    model.to(dev)
    sampler = DistributedSampler(TensorDataset(x, y), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size // world, sampler=sampler)
    steps_per_epoch = len(loader)
    opt_cls = torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.Adam
    kw = dict(momentum=cfg.momentum, nesterov=cfg.nesterov) if cfg.optimizer == "sgd" else dict(betas=cfg.betas)
    opt = opt_cls(param_groups(model, cfg.weight_decay, hooks.no_decay), lr=cfg.lr, **kw)
    if hooks.on_optimizer is not None:
        hooks.on_optimizer(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps_per_epoch, cfg))
    hist, start = History(), 0
    if cfg.resume:
        state = load_state(cfg.resume)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start, hist.best_acc = int(state["epoch"]) + 1, state.get("best_acc")
        hist.epochs, hist.steps = list(state.get("history", [])), int(state.get("steps", 0))
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    end = min(cfg.epochs, cfg.stop_after or cfg.epochs)
    bar = _progress(cfg.progress and rank == 0)
    if bar is not None:
        bar.start()
    try:
        for epoch in range(start, end):
            sampler.set_epoch(epoch)
            net.train()
            task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch, info="") if bar else None
            seen, loss_sum, correct, t0 = 0, 0.0, 0, time.perf_counter()
            for xb, yb in loader:
                xb, yb = xb.to(dev), yb.to(dev)
                out = net(xb)
                loss = criterion(out, yb)
                if hooks.regulariser is not None:
                    loss = loss + hooks.regulariser(model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if hooks.after_backward is not None:
                    hooks.after_backward(model)
                opt.step()
                sched.step()
                if hooks.after_step is not None:
                    with torch.no_grad():
                        hooks.after_step(model)
                hist.steps += 1
                seen += len(xb)
                loss_sum += float(loss.detach()) * len(xb)
                correct += int((out.detach().argmax(1) == yb).sum())
                if bar:
                    ips = seen * world / max(time.perf_counter() - t0, 1e-9)
                    bar.update(task, advance=1, info=f"loss {loss_sum / seen:.4f} acc {correct / seen:.3f} "
                                                     f"lr {opt.param_groups[0]['lr']:.2e} {ips:.0f} img/s")
            rec = {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen, "lr": opt.param_groups[0]["lr"]}
            if val is not None and rank == 0:
                rec["val_acc"], rec["val_loss"] = evaluate(model, val)
            hist.epochs.append(rec)
            if bar:
                bar.remove_task(task)
                bar.console.print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
            improved = "val_acc" in rec and (hist.best_acc is None or rec["val_acc"] > hist.best_acc)
            if improved:
                hist.best_acc = rec["val_acc"]
            if rank == 0 and cfg.checkpoint_dir:
                state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "epoch": epoch, "rng": torch.get_rng_state(), "best_acc": hist.best_acc,
                         "history": hist.epochs, "steps": hist.steps}
                _save(state, os.path.join(cfg.checkpoint_dir, "last.pt"))
                if improved:
                    _save(state, os.path.join(cfg.checkpoint_dir, "best.pt"))
    finally:
        if bar is not None:
            bar.stop()
    model.eval()
    model.to(home)
    return hist


def _save(state: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
