"""Training: a small loop (``fit``) with method hooks, DDP under torchrun, resumable checkpoints;
network slimming, C-SGD, stripe-wise pruning and Pruning from Scratch on top of it.

>>> import torch
>>> from surgery.train import TrainConfig, fit
>>> net = torch.nn.Linear(4, 3)
>>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
>>> h = fit(net, (x, y), (x, y), TrainConfig(epochs=2, lr=0.1, batch_size=8, progress=False))
>>> [r["epoch"] for r in h.epochs], 0.0 <= h.last["val_acc"] <= 1.0
([0, 1], True)
"""

from .config import Hooks, TrainConfig, TrainError, lr_factor, param_groups, split
from .recipes import layer_steps, prune_layerwise, train_csgd, train_from_scratch, train_swp
from .slimming import slimmed_norms, slimming, sparsity_hook
from .trainer import History, evaluate, fit, load_state

__all__ = ["Hooks", "History", "TrainConfig", "TrainError", "evaluate", "fit", "layer_steps", "load_state", "lr_factor",
           "param_groups", "prune_layerwise", "slimmed_norms", "slimming", "sparsity_hook", "split", "train_csgd", "train_from_scratch",
           "train_swp"]
