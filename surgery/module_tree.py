"""The pruned model as the user's own object: a deep copy of their model whose modules have the new
widths, instead of a ``GraphModule``.

The copy is made with every tensor that loses entries already sliced (and folded), sharing them with
the pruned ``GraphModule`` of the same plan (only one of the two is returned), then each changed
module's size attributes are set: by its op rule's ``fix`` (``in_channels``, ``num_features``,
``num_heads``, ...) for the ``torch.fx`` front end, by a refresh from the parameters' shapes for
``torch.nn`` layers under the ``torch.export`` front end. Other modules whose tensors shrank (a class
token, a relative-position table) keep their attributes. The graph stays the analysis; the product
is ``type(model)`` with its attributes, methods and training flags.

The user's ``forward`` may hold a width as a literal that no module attribute explains
(``x.view(-1, 512)``); then the copy cannot be right. ``check`` runs the copy and the rewritten
``GraphModule`` on the example inputs and on a batch twice as large and compares them; any difference
or error is returned as the reason the ``GraphModule`` is used instead.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .compensation import install_module, owner_module
from .dependency_graph import DependencyGraph
from .dependency_graph.context import RewriteCtx
from .dependency_graph.rules import lookup
from .dependency_graph.tracing import eval_mode

__all__ = ["build", "check", "refresh_attributes", "output_tensors"]


def refresh_attributes(module: nn.Module) -> bool:
    """Set a ``torch.nn`` layer's size attributes from its tensors' shapes; False for other types
    (left as they are)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        w = module.weight
        old_in, old_groups = module.in_channels, module.groups
        depthwise = old_groups > 1 and old_groups == old_in
        if module.transposed:
            out = w.shape[1] * old_groups if not depthwise else w.shape[1] * w.shape[0]
            new_in = w.shape[0]
        else:
            out = w.shape[0]
            new_in = w.shape[1] * old_groups if not depthwise else out // (module.out_channels // old_groups)
        if depthwise:
            module.groups = new_in
        module.in_channels, module.out_channels = new_in, out
        return True
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
        return True
    if isinstance(module, (nn.modules.batchnorm._NormBase,)):
        t = module.weight if module.weight is not None else module.running_mean
        if t is None:
            return False
        module.num_features = t.shape[0]
        return True
    if isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
        return True
    if isinstance(module, nn.GroupNorm) and module.weight is not None:
        per_group = module.num_channels // module.num_groups
        module.num_channels = module.weight.shape[0]
        module.num_groups = module.num_channels // per_group
        return True
    if isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape
        return True
    if isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.numel()
        return True
    if _torchvision_window_attention(module):  # pruned by whole heads: one table column per head
        module.num_heads = module.relative_position_bias_table.shape[1]
        return True
    return False


def _torchvision_window_attention(module: nn.Module) -> bool:
    """torchvision's Swin window attention (2D, V2 and 3D), whose ``forward`` passes ``self.num_heads``."""
    mod = type(module).__module__
    return (mod in ("torchvision.models.swin_transformer", "torchvision.models.video.swin_transformer")
            and type(module).__name__.startswith("ShiftedWindowAttention")
            and getattr(module, "relative_position_bias_table", None) is not None)


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(module.named_parameters(remove_duplicate=False))
    out.update(module.named_buffers(remove_duplicate=False))
    return out


def _shared_memo(model: nn.Module, graph: DependencyGraph, result: nn.Module) -> dict[int, torch.Tensor]:
    """Deep-copy memo handing the copy of ``model`` the tensors of the pruned graph result ``result``
    (already sliced and folded) wherever the traced graph holds the model's own tensor under the same
    name. Only one of the two results is returned, so they may share: the module result then costs
    no second copy of the weights (a 600M-parameter model fits under a memory cap it did not)."""
    traced, made = _named_tensors(graph.gm), _named_tensors(result)
    memo: dict[int, torch.Tensor] = {}
    for name, t in _named_tensors(model).items():
        new = made.get(name)
        if traced.get(name) is t and new is not None and type(new) is type(t):
            memo[id(t)] = new
    return memo


def build(model: nn.Module, graph: DependencyGraph, removed, per_tensor: dict, folded: dict,
          sliced_copies, result: nn.Module | None = None, biases: dict | None = None) -> tuple[nn.Module | None, str]:
    """``(pruned copy of model, "")`` or ``(None, why not)``; ``sliced_copies(model, per_tensor, folded)``
    is the rewrite's deep-copy memo of the tensors that lose entries; the copy shares its tensors with
    ``result`` (the pruned ``GraphModule`` of the same plan) where they are the same tensor.
    ``biases`` (``{(owner, "bias"): tensor}``) are the biases a compensation gives linears that had
    none (:mod:`surgery.compensation`): set on the copy's ``nn.Linear`` modules."""
    tensors = {}
    for owner, name in {**per_tensor, **folded}:
        try:
            tensors[(owner, name)] = getattr(owner_module(model, owner), name)
        except AttributeError:
            return None, f"the traced graph names a tensor {owner}.{name} that the model does not have"
        if not isinstance(tensors[(owner, name)], torch.Tensor):
            return None, f"{owner}.{name} is not a tensor of the model"
    memo = _shared_memo(model, graph, result) if result is not None else {}
    rest = [k for k, t in tensors.items() if id(t) not in memo]
    memo.update(sliced_copies(model, {k: v for k, v in per_tensor.items() if k in rest},
                              {k: v for k, v in folded.items() if k in rest}))
    out = copy.deepcopy(model, memo)
    if biases:
        why = install_module(out, biases)
        if why:
            return None, why
    owners = {owner for owner, _ in per_tensor} | {owner for owner, _ in folded}
    if graph.frontend == "fx" and graph.root is model:
        done: set[str] = set()
        for node in graph.fx_graph.nodes:
            if node.op != "call_module" or node.target in done or node.target not in owners:
                continue
            done.add(node.target)
            rule = lookup(node, graph.root.get_submodule(node.target))
            if rule is not None and rule.fix is not None:
                try:
                    rule.fix(out.get_submodule(node.target), RewriteCtx(graph, node, node, removed))
                except Exception as exc:  # the graph result is still right: report and fall back
                    return None, f"cannot set the widths of {node.target}: {exc}".splitlines()[0]
        owners -= done
    for owner in sorted(owners):
        # torch.nn layers get their size attributes from their tensors; any other module keeps its
        # attributes, and ``check`` decides whether its forward still agrees with the pruned graph
        refresh_attributes(owner_module(out, owner))
    from .hf import is_hf_model, sync_config

    if is_hf_model(out):  # config and config-derived attributes follow the new widths (surgery.hf)
        try:
            sync_config(out, model)
        except Exception as exc:  # the graph result is still right: report and fall back
            return None, f"cannot update the Hugging Face config: {exc}".splitlines()[0]
    return out, ""


def output_tensors(y) -> list[torch.Tensor]:
    """Every tensor of a model's output (nested tuples, lists, dicts, dataclasses), in order."""
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, (tuple, list)):
        return [t for v in y for t in output_tensors(v)]
    if isinstance(y, dict):
        return [t for v in y.values() for t in output_tensors(v)]
    return [t for v in getattr(y, "__dict__", {}).values() for t in output_tensors(v)] if hasattr(y, "__dataclass_fields__") else []


def _probe(inputs: tuple, batch: int) -> tuple:
    gen = torch.Generator().manual_seed(0)
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() > 0:
            shape = (x.shape[0] * batch, *x.shape[1:])
            out.append(torch.randn(shape, generator=gen, dtype=x.dtype))
        elif isinstance(x, torch.Tensor) and x.dim() > 0:
            out.append(torch.cat([x] * batch))
        else:
            out.append(x)
    return tuple(out)


def _run(model: nn.Module, inputs: tuple):
    with torch.no_grad(), eval_mode(model):
        return model(*inputs)


def check(candidate: nn.Module, reference: nn.Module, inputs: tuple, tol: float = 1e-4) -> str:
    """"" when ``candidate`` computes what ``reference`` computes on ``inputs`` and on a batch twice as
    large (where the reference runs at all); else the first difference, as one line."""
    first: list[tuple] = []
    for batch in (1, 2):
        probe = _probe(inputs, batch)
        try:
            want = output_tensors(_run(reference, probe))
        except Exception:
            if batch == 1:
                return ""  # nothing to compare against
            continue  # the graph result is shape-locked; the module result is checked at batch 1
        if batch == 1:
            first = [tuple(t.shape) for t in want]
        elif [tuple(t.shape) for t in want] == first and any(s and s[0] == 1 for s in first):
            continue  # the graph result ignores the batch (sizes baked in by torch.export): checked at batch 1
        try:
            got = output_tensors(_run(candidate, probe))
        except Exception as exc:
            return f"the model's own forward fails on the pruned widths ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        if len(got) != len(want):
            return "the model's own forward returns a different number of tensors after pruning"
        for a, b in zip(got, want):
            if a.shape != b.shape:
                return f"the model's own forward gives shape {tuple(a.shape)} where the pruned graph gives {tuple(b.shape)}"
            if a.is_floating_point():
                err = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))
                if err > tol:
                    return f"the model's own forward differs from the pruned graph (rel err {err:.1e}): a width is held outside its modules"
            elif not torch.equal(a, b):
                return "the model's own forward differs from the pruned graph"
    return ""
