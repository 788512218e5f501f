"""Run the traced graph over calibration batches and hand watched activations to a visitor.

The recorder is a ``torch.fx.Interpreter`` over the graph the dependency analysis was built on, so
an activation is named by its fx node, exactly as the group's spaces are. Each batch is visited and
dropped before the next one runs: a method keeps running statistics, never the activations.

With ``grad=True`` the loss (``loss(outputs, labels)``, cross-entropy by default) is differentiated
with ``torch.autograd.grad`` with respect to the watched activations only, so no ``.grad`` of the
user's parameters is touched; BatchNorm runs in eval mode throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.fx
import torch.nn.functional as F

from ..dependency_graph.tracing import eval_mode
from ..errors import SurgeryError
from .data import Calibration

__all__ = ["record", "default_loss"]

Visitor = Callable[[dict[str, torch.Tensor], "dict[str, torch.Tensor] | None", "torch.Tensor | None"], None]


class _Watcher(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, watch: set[str]):
        super().__init__(gm)
        self.watch = watch
        self.seen: dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node):
        value = super().run_node(n)
        if n.name in self.watch and isinstance(value, torch.Tensor):
            self.seen[n.name] = value
        return value


def default_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the (first) output against integer labels."""
    out = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise SurgeryError("the default loss (cross-entropy) needs class logits as the model output; pass loss=...")
    if out.dim() > 2:
        out = out.flatten(2).mean(-1)
    return F.cross_entropy(out if out.dtype in (torch.float32, torch.float64) else out.float(), labels)


def record(graph, calibration: Calibration, watch: Iterable[str], visit: Visitor, *, grad: bool = False,
           loss: Callable | None = None, progress: Callable[[str], None] | None = None) -> int:
    """Run every calibration batch through ``graph``'s model; call ``visit(acts, grads, labels)``.

    ``acts`` maps each watched node name to its activation for the batch (detached); ``grads`` maps
    it to d loss / d activation when ``grad`` (else ``None``). Returns the number of batches seen.
    """
    watch = set(watch)
    gm = graph.gm
    n = 0
    total = len(calibration)
    with eval_mode(gm):
        for inputs, labels in calibration:
            n += 1
            if progress is not None:
                progress(f"calibration batch {n}" + (f"/{total}" if total else ""))
            runner = _Watcher(gm, watch)
            if not grad:
                with torch.no_grad():
                    runner.run(*inputs)
                visit({k: v.detach() for k, v in runner.seen.items()}, None, labels)
                continue
            if labels is None and loss is None:
                raise SurgeryError("this method needs labels with the calibration data (x, y), or a loss callable")
            inputs = tuple(x.detach().requires_grad_() if x.is_floating_point() else x for x in inputs)
            with torch.enable_grad():
                outputs = runner.run(*inputs)
                value = (loss or default_loss)(outputs, labels)
                names = [k for k, v in runner.seen.items() if v.requires_grad]
                grads = torch.autograd.grad(value, [runner.seen[k] for k in names], allow_unused=True) if names else ()
            gdict = {k: (g if g is not None else torch.zeros_like(runner.seen[k])).detach() for k, g in zip(names, grads)}
            visit({k: v.detach() for k, v in runner.seen.items()}, gdict, labels)
    return n
