"""Training configuration (a frozen dataclass), hooks, the learning-rate schedule and the data split."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SurgeryError

__all__ = ["TrainConfig", "Hooks", "TrainError", "split", "lr_factor", "param_groups"]

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "multistep", "constant")
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


class TrainError(SurgeryError):
    """A training option or input is wrong."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a training run.

    ``batch_size`` is the *global* batch: under DDP with N processes each one takes
    ``batch_size // N`` samples a step, so N processes take the same steps as one. ``milestones`` are
    fractions of ``epochs`` where ``multistep`` multiplies the LR by ``gamma``. ``warmup_epochs``
    ramps the LR linearly from ``lr / warmup_steps`` to ``lr``. Biases and norm-layer parameters get
    no weight decay. ``checkpoint_dir`` receives ``last.pt`` every epoch and ``best.pt`` when the
    validation accuracy improves (rank 0 only); ``resume`` continues from such a file.
    ``stop_after`` ends the run after that epoch (the schedule still spans ``epochs``).
    """

    epochs: int = 1
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    batch_size: int = 64
    seed: int = 0
    checkpoint_dir: str | None = None
    resume: str | None = None
    stop_after: int | None = None
    progress: bool = True

    def __post_init__(self):
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TrainError(f"{name} must be a positive integer, got {v!r}")

        positive_int("epochs")
        positive_int("batch_size")
        if self.stop_after is not None:
            positive_int("stop_after")
        if self.optimizer not in OPTIMIZERS:
            raise TrainError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise TrainError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("weight_decay", "warmup_epochs", "momentum"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise TrainError(f"{name} must be a non-negative number, got {v!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise TrainError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise TrainError("nesterov needs the sgd optimizer with momentum > 0")


@dataclass(frozen=True)
class Hooks:
    """Where methods plug in; each receives the plain (unwrapped) model.

    ``after_backward(model)``: rewrite gradients (after the DDP all-reduce, before the step).
    ``regulariser(model) -> tensor``: added to the loss before backward.
    ``after_step(model)``: projection, clamping or masking after every optimiser step.
    ``no_decay``: parameter names that get no optimizer weight decay; ``on_optimizer(opt)``: sees the
    optimizer once it exists.
    """

    after_backward: Callable[[nn.Module], None] | None = None
    regulariser: Callable[[nn.Module], torch.Tensor] | None = None
    after_step: Callable[[nn.Module], None] | None = None
    #: qualified names of parameters whose weight decay a method handles itself (C-SGD's decay matrix)
    no_decay: frozenset = frozenset()
    #: called once with the optimizer the loop made (SWP clears the momentum of masked entries)
    on_optimizer: Callable[[torch.optim.Optimizer], None] | None = None


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimiser step ``step`` (0-based): linear warmup, then the schedule."""
    total = cfg.epochs * steps_per_epoch
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "cosine":
        span = max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warm, span) / span))
    if cfg.schedule == "multistep":
        epoch = step / steps_per_epoch
        return cfg.gamma ** sum(epoch >= m * cfg.epochs for m in cfg.milestones)
    return 1.0


def param_groups(model: nn.Module, weight_decay: float, exclude=frozenset()) -> list[dict]:
    """Two groups: weights with ``weight_decay``; biases, norm-layer parameters and the parameters
    named in ``exclude`` with none."""
    decay, no_decay, seen = [], [], set()
    for mname, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{name}" if mname else name
            (no_decay if isinstance(module, _NORMS) or name == "bias" or full in exclude else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def split(x: torch.Tensor, y: torch.Tensor, val_split: float = 0.2, seed: int = 0):
    """Deterministic ``((x_train, y_train), (x_val, y_val))``; ``val_split=0`` gives ``(train, None)``.

    >>> (xt, yt), (xv, yv) = split(torch.arange(10.0), torch.arange(10), 0.2)
    >>> len(xt), len(xv), sorted(torch.cat([yt, yv]).tolist()) == list(range(10))
    (8, 2, True)
    """
    if y is None:
        raise TrainError("training needs labels (data with x and y)")
    if len(x) != len(y):
        raise TrainError(f"x has {len(x)} samples but y has {len(y)}")
    if not 0.0 <= val_split < 1.0:
        raise TrainError(f"val_split must be in [0, 1), got {val_split!r}")
    n_val = int(round(len(x) * val_split))
    if val_split > 0 and not 0 < n_val < len(x):
        raise TrainError(f"val_split {val_split} leaves an empty train or validation set of {len(x)} samples")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, va = perm[n_val:], perm[:n_val]
    return (x[tr], y[tr]), ((x[va], y[va]) if n_val else None)
