"""Depth pruning of a Hugging Face model: remove whole transformer blocks, rank blocks by influence.

:func:`remove_layers` returns a copy of the model (same class, the user's model untouched) without
the chosen blocks, that stays a model its stock config describes: every ``layer_idx`` is renumbered
0..n-1 (the KV cache is indexed by it, so ``generate`` with ``use_cache=True`` needs it), the layer
count is written under the config's own name (``num_hidden_layers`` / ``n_layer`` / ``num_layers``,
T5's ``num_decoder_layers``, BART's ``encoder_layers``...), per-layer config lists are sliced
(``layer_types``, ``mlp_layer_types``, ``no_rope_layers``...), lists of layer indices renumbered
(``mlp_only_layers``) and layer-count boundaries moved (``max_window_layers``). A model of the same
class is then built from the new config on the meta device and must have the same tensors, and every
attribute its blocks derive from their position must agree: otherwise ``from_pretrained`` would build
a different model and :class:`~surgery.errors.PlanError` says which attribute (GPT-2 with
``scale_attn_by_inverse_layer_idx`` scales attention by 1 / (layer_idx + 1)). T5's relative position
bias lives in the first block of a stack and serves every block: removing that block hands the
table to the new first block. A model pruned with different widths per layer keeps them
(``surgery_layer_widths``) under the kept blocks' new names, for ``save_pruned`` / ``load_pruned``.

:func:`layer_importance` is ShortGPT's *block influence*: 1 - the mean cosine similarity between a
block's input and output hidden states, the blocks that change the residual stream least first to go.
"""

from __future__ import annotations

import copy
import operator
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PlanError, SurgeryError
from .config import _first_difference, _knows, _meta_model, _shapes, blocks, is_hf_model, sync_config

__all__ = ["layer_importance", "remove_layers"]

_INDEX_LISTS = ("mlp_only_layers", "moe_layers")  # lists of layer indices: renumbered, not sliced
_BOUNDARIES = ("max_window_layers", "first_k_dense_replace")  # "layers below this index" counts
_ENCODER_COUNT = ("encoder_layers", "num_encoder_layers", "num_layers", "num_hidden_layers")
_DECODER_COUNT = ("decoder_layers", "num_decoder_layers")


def _stacks(model: nn.Module) -> dict[str, int]:
    """``{ModuleList name: number of blocks}`` of the outermost block stacks, in model order."""
    found: dict[str, int] = {}
    for name, _ in blocks(model):
        stack = name.rpartition(".")[0]
        found[stack] = found.get(stack, 0) + 1
    return {s: n for s, n in found.items() if not any(s.startswith(o + ".") for o in found if o != s)}


def _out_of_range(item, stack: str, n: int) -> PlanError:
    return PlanError(f"layer {item!r} out of range: {stack} has {n} blocks (0..{n - 1}, or -{n}..-1)")


def _by_name(model: nn.Module, stacks: dict[str, int], item: str) -> tuple[str, int]:
    """``"encoder.block.1"`` / ``"model.layers.3"``: the stack whose name ends with the prefix, the index."""
    prefix, _, index = item.rpartition(".")
    example = f"{next(iter(stacks))}.0"
    if not prefix or not index.lstrip("-").isdigit():
        raise PlanError(f"{item!r} does not name a block: give an index or a block name such as {example!r}")
    matches = [s for s in stacks if s == prefix or s.endswith("." + prefix)]
    if len(matches) != 1:
        what = "no" if not matches else "more than one"
        raise PlanError(f"{item!r}: {what} block stack of {type(model).__name__} is named {prefix!r} "
                        f"(its stacks: {', '.join(stacks)})")
    n, i = stacks[matches[0]], int(index)
    if not -n <= i < n:
        raise _out_of_range(item, matches[0], n)
    return matches[0], i % n


def _resolve(model: nn.Module, stacks: dict[str, int], layers) -> dict[str, list[int]]:
    """``{stack: sorted indices to drop}`` from ints (one stack) or block names; refuses duplicates
    and emptying a stack."""
    items = [layers] if isinstance(layers, (int, str)) else list(layers)
    chosen: dict[str, dict[int, object]] = {s: {} for s in stacks}
    for item in items:
        if isinstance(item, str):
            stack, i = _by_name(model, stacks, item)
        else:
            try:
                if isinstance(item, bool):
                    raise TypeError
                item = operator.index(item)
            except TypeError:
                raise PlanError(f"layers are block indices or names, got {item!r}") from None
            if len(stacks) > 1:
                raise PlanError(f"{type(model).__name__} has several block stacks ({', '.join(stacks)}): "
                                f"name the block, e.g. '{next(iter(stacks))}.{item}'")
            stack, n = next(iter(stacks.items()))
            if not -n <= item < n:
                raise _out_of_range(item, stack, n)
            i = item % n
        if i in chosen[stack]:
            raise PlanError(f"block {stack}.{i} given twice ({chosen[stack][i]!r} and {item!r})")
        chosen[stack][i] = item
    for stack, drop in chosen.items():
        if len(drop) == stacks[stack]:
            raise PlanError(f"cannot remove all {stacks[stack]} blocks of {stack}: at least one must stay")
    return {s: sorted(d) for s, d in chosen.items() if d}


def _config_tree(config) -> list:
    """The config and every config nested in it (``text_config``, ``vision_config``...)."""
    from transformers import PreTrainedConfig

    out, todo = [], [config]
    while todo:
        c = todo.pop()
        if all(c is not o for o in out):
            out.append(c)
            todo += [v for v in vars(c).values() if isinstance(v, PreTrainedConfig)]
    return out


def _count_config(model: nn.Module, stack: str, public: list):
    """The config that ``save_pretrained`` writes the stack's layer count in: the owner's, when it is
    the model's config or nested in it, else (a private copy, as T5's stacks hold) the model's."""
    owner = _owner_config(model, stack)
    return owner if any(owner is p for p in public) else model.config


def _owner_config(model: nn.Module, stack: str):
    """The config the module holding ``stack`` was built from (the nearest ancestor's ``config``)."""
    parts = stack.split(".")
    for k in range(len(parts) - 1, -1, -1):
        cfg = getattr(model.get_submodule(".".join(parts[:k])), "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            return cfg
    return model.config


def _set_count(cfg, stack: str, n: int, several: bool) -> None:
    is_decoder = "decoder" in stack.split(".")
    names = (_DECODER_COUNT if is_decoder else _ENCODER_COUNT) if several else ("num_hidden_layers",)
    name = next((k for k in names if _knows(cfg, k)), None)
    if name is None:
        raise PlanError(f"{type(cfg).__name__} names no layer count for {stack} (looked for {', '.join(names)})")
    setattr(cfg, name, n)


def _slice_lists(cfg, stack: str, old_n: int, keep: list[int], several: bool) -> None:
    """Slice the per-layer lists, renumber the index lists, move the boundaries of ``cfg``."""
    for key in cfg.to_dict():
        value = getattr(cfg, key, None)
        if key in _BOUNDARIES and isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, key, sum(1 for i in keep if i < value))
        elif not isinstance(value, (list, tuple)):
            continue
        elif key in _INDEX_LISTS:
            setattr(cfg, key, type(value)(keep.index(i) for i in value if i in keep))
        elif len(value) == old_n and ("layer" in key or "block" in key):
            if several:
                raise PlanError(f"{type(cfg).__name__}.{key} has one entry per layer but the config describes "
                                f"several block stacks: cannot tell whether it belongs to {stack}")
            setattr(cfg, key, type(value)(value[i] for i in keep))


def _hand_over_position_bias(old_stack: nn.ModuleList, new_stack: nn.ModuleList, drop: list[int]) -> None:
    """T5: the first block computes the relative position bias every later block reuses; when it goes,
    the new first block gets its table (so the stack still adds the same bias, as a rebuilt model does)."""
    if 0 not in drop:
        return
    first = next(i for i in range(len(old_stack)) if i not in drop)
    for name, m in old_stack[0].named_modules():
        if getattr(m, "has_relative_attention_bias", False) and isinstance(getattr(m, "relative_attention_bias", None), nn.Module):
            target = new_stack[first].get_submodule(name)
            target.relative_attention_bias = copy.deepcopy(m.relative_attention_bias)
            target.has_relative_attention_bias = True


def _scalars(module: nn.Module) -> dict[str, object]:
    """What ``__init__`` derived from the config: the public int / float / str / bool / None attributes."""
    ok = (int, float, str, bool, type(None))
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k != "training"
            and (isinstance(v, ok) or (isinstance(v, tuple) and all(isinstance(i, ok) for i in v)))}


def _check_rebuild(model: nn.Module, new: nn.Module, kept: dict[str, list[int]]) -> None:
    """Build the class from the old and the new config (meta device): the new model's tensors must be
    the rebuilt one's; attributes that depend on a block's position must agree in the kept blocks (else
    ``from_pretrained`` would build a different model); attributes outside the blocks that depend on
    the layer count (``has_sliding_layers``) are taken from the rebuilt model."""
    before, after = _meta_model(model, model.config), _meta_model(new, new.config)
    if getattr(new.config, "surgery_layer_widths", None) is None:  # else save_pretrained refuses anyway
        diff = _first_difference(_shapes(new), _shapes(after))
        if diff:
            raise PlanError(f"a {type(new).__name__} built from the updated config does not match the kept blocks ({diff})")
    mods = dict(new.named_modules())
    for stack, keep in kept.items():
        for j, i in enumerate(keep):
            old_block = dict(before.get_submodule(f"{stack}.{i}").named_modules())
            for name, rebuilt in after.get_submodule(f"{stack}.{j}").named_modules():
                where = f"{stack}.{j}.{name}" if name else f"{stack}.{j}"
                was, now = _scalars(old_block[name]) if name in old_block else {}, _scalars(rebuilt)
                mine = mods.get(where)
                for key in sorted(set(was) | set(now)):
                    if was.get(key) != now.get(key) and getattr(mine, key, None) != now.get(key):
                        raise PlanError(f"{where}.{key} is {getattr(mine, key, None)!r} but a {type(new).__name__} rebuilt "
                                        f"from the config gives {now.get(key)!r} at the block's new position: "
                                        f"from_pretrained would compute differently, remove later blocks only")
    inside = tuple(s + "." for s in kept)
    old_modules = dict(before.named_modules())
    for name, rebuilt in after.named_modules():
        if name.startswith(inside) or name not in old_modules:
            continue
        was, mine = _scalars(old_modules[name]), mods[name]
        for key, value in _scalars(rebuilt).items():
            if key in was and was[key] != value:
                setattr(mine, key, value)


def _resync_per_layer_widths(model: nn.Module) -> None:
    """A model pruned with different widths per layer (``surgery_layer_widths``, kept by
    ``save_pruned`` / ``load_pruned``): its widths and ``save_pretrained``'s refusal are read again
    from the kept blocks, under their new names (the warning was given when it was pruned)."""
    if getattr(model.config, "surgery_layer_widths", None) is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sync_config(model)


def remove_layers(model: nn.Module, layers) -> nn.Module:
    """A copy of the Hugging Face ``model`` without the blocks ``layers``, which its config describes.

    ``layers``: block indices (negative from the end) when the model has one stack, or block names
    (``"model.layers.3"``, or their end ``"encoder.block.1"`` / ``"decoder.block.0"``, the form needed
    when there are several stacks, as in T5). See the module docstring for what is renumbered and why."""
    if not is_hf_model(model):
        raise SurgeryError(f"remove_layers needs a transformers PreTrainedModel, got {type(model).__name__}")
    stacks = _stacks(model)
    if not stacks:
        raise PlanError(f"{type(model).__name__} has no list of transformer blocks to remove layers from")
    drop = _resolve(model, stacks, layers)
    memo: dict = {id(model.get_submodule(f"{s}.{i}")): None for s, idxs in drop.items() for i in idxs}
    new = copy.deepcopy(model, memo)  # the dropped blocks are not copied
    public = _config_tree(new.config)
    targets = {s: _count_config(new, s, public) for s in stacks}
    kept = {s: [i for i in range(n) if i not in drop.get(s, [])] for s, n in stacks.items()}
    for stack, idxs in drop.items():
        old_n, keep = stacks[stack], kept[stack]
        new_stack = new.get_submodule(stack)
        _hand_over_position_bias(model.get_submodule(stack), new_stack, idxs)
        for i in reversed(idxs):
            del new_stack[i]
        for j, block in enumerate(new_stack):
            for m in block.modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = j
        several = sum(1 for t in targets.values() if t is targets[stack]) > 1
        owner = _owner_config(new, stack)
        if owner is not targets[stack]:  # a private copy (T5's stacks): its own count, then the model's
            _set_count(owner, stack, len(keep), False)
            _slice_lists(owner, stack, old_n, keep, False)
        _set_count(targets[stack], stack, len(keep), several)
        _slice_lists(targets[stack], stack, old_n, keep, several)
    _resync_per_layer_widths(new)
    _check_rebuild(model, new, kept)
    return new


@torch.no_grad()
def layer_importance(model: nn.Module, ids: torch.Tensor, **inputs) -> dict[str, float]:
    """``{block name: 1 - mean cosine similarity(block input, block output)}`` over ``ids``' tokens.

    ShortGPT's block influence: a block that leaves the hidden states' direction unchanged scores 0 and
    is the first to remove (``sorted(scores, key=scores.get)``). The block's own input and output are
    captured with forward hooks rather than ``output_hidden_states=True``, whose last entry is, in
    transformers 5.x, the hidden state after the final norm, not the last block's output. ``inputs``
    go to the forward (an ``attention_mask`` also weights the tokens); an encoder-decoder gets ``ids``
    as ``decoder_input_ids`` too unless given."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        raise SurgeryError(f"layer_importance needs token ids as a (batch, seq) LongTensor, got {getattr(ids, 'shape', type(ids).__name__)}")
    stacks = _stacks(model)
    if not stacks:
        raise PlanError(f"{type(model).__name__} has no list of transformer blocks to rank")
    named = [(n, b) for n, b in blocks(model) if n.rpartition(".")[0] in stacks]
    mask = inputs.get("attention_mask")
    sums: dict[str, list[float]] = {n: [0.0, 0.0] for n, _ in named}

    def hook(name):
        def record(module, args, kwargs, out):
            x = args[0] if args else kwargs.get("hidden_states")
            y = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.shape != y.shape:
                raise SurgeryError(f"{name}: cannot read the block's input and output hidden states")
            cos = F.cosine_similarity(x.double(), y.double(), dim=-1)
            w = mask.to(cos.dtype) if mask is not None and mask.shape == cos.shape else torch.ones_like(cos)
            sums[name][0] += float((cos * w).sum())
            sums[name][1] += float(w.sum())
        return record

    kwargs = dict(inputs)
    if getattr(model.config, "is_encoder_decoder", False) and "decoder_input_ids" not in kwargs:
        kwargs["decoder_input_ids"] = ids
    handles = [b.register_forward_hook(hook(n), with_kwargs=True) for n, b in named]
    training = model.training
    try:
        model.eval()
        model(ids, **kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return {n: 1.0 - s / max(c, 1.0) for n, (s, c) in sums.items()}
