"""Write a pruned Hugging Face model's widths into its ``config`` and its modules' derived attributes.

Widths are read from the pruned tensors, per transformer block: query heads (query projection rows /
head dim; GPT-2's fused ``c_attn`` / 3), key/value heads, MLP neurons; the hidden size from the input
embedding. When every block agrees, they are written under the config's own names (``hidden_size`` /
``n_embd`` / ``d_model``, ``intermediate_size`` / ``n_inner`` / ``d_ff``, ``num_attention_heads`` /
``n_head`` / ``num_heads``, ``num_key_value_heads``, ``head_dim`` / ``d_kv`` written explicitly; a
Mixture-of-Experts block's fused experts ``moe_intermediate_size`` / ``intermediate_size`` and its shared
expert ``shared_expert_intermediate_size``), a
model of the same class is built from that config on the meta device, and its state-dict shapes must
equal the pruned model's: then ``from_pretrained`` rebuilds exactly this model. The scalar attributes
its ``__init__`` derived from the config (``num_key_value_groups``, ``scaling``, GPT-2's
``split_size``, ``Conv1D.nf``, ...) are copied onto the pruned modules.

When blocks differ (a plan without ``policy="uniform"``), each block gets the attributes a model built
with *its* widths would have, so the module runs; the widths go to ``config.surgery_layer_widths``, a
warning says so, and ``save_pretrained`` raises :class:`NonUniformWidths`
(:func:`surgery.hf.save_pruned` / :func:`surgery.hf.load_pruned` keep it).
"""

from __future__ import annotations

import copy
import math
import sys
import types
import warnings

import torch
from torch import nn

from ..errors import SurgeryError
from .biases import grant_bias_flags

__all__ = ["NonUniformWidths", "is_hf_model", "layer_widths", "sync_config"]

# width kind -> config attribute names, first one the config knows is written
CONFIG_NAMES = {
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "intermediate": ("intermediate_size", "n_inner", "d_ff"),
    "heads": ("num_attention_heads", "n_head", "num_heads"),
    "kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim", "d_kv"),
    # Mixture-of-Experts: every expert's neurons (Mixtral and OLMoE call them intermediate_size), the
    # shared expert's (Qwen2-MoE)
    "experts_intermediate": ("moe_intermediate_size", "intermediate_size"),
    "shared_intermediate": ("shared_expert_intermediate_size",),
}
_Q = ("q_proj", "query", "q", "c_attn")
_K = ("k_proj", "key", "k")
_MLP_IN = ("gate_proj", "up_proj", "fc1", "c_fc", "wi", "wi_0", "intermediate.dense")


class NonUniformWidths(SurgeryError):
    """A pruned HF model whose layers have different widths: a stock config cannot describe it."""


def is_hf_model(model) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (without importing transformers)."""
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def _knows(config, name: str) -> bool:
    return name in config.to_dict() or name in getattr(config, "attribute_map", {})


def _config_name(config, kind: str) -> str | None:
    return next((n for n in CONFIG_NAMES[kind] if _knows(config, n)), None)


def head_dim_of(config) -> int:
    """Per-head width of the original config (pruning removes whole heads, never head dims)."""
    for name in ("surgery_head_dim", "head_dim", "d_kv"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return int(getattr(config, "hidden_size")) // int(getattr(config, "num_attention_heads"))


def _out_width(m: nn.Module) -> int | None:
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    return int(w.shape[1]) if type(m).__name__ == "Conv1D" else int(w.shape[0])  # Conv1D stores (in, out)


def _find(block: nn.Module, names, shared: bool = False) -> tuple[str, nn.Module] | None:
    """The first module of ``block`` named by ``names`` with a 2-D weight; one inside a shared expert
    (Qwen2-MoE's ``mlp.shared_expert``) only when ``shared``: its width has a config name of its own."""
    for qual, m in block.named_modules():
        if ("shared_expert" in qual.split(".")) != shared:
            continue
        if any(qual == n or qual.endswith("." + n) for n in names) and _out_width(m) is not None:
            return qual, m
    return None


def moe_widths(block: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """``{kind: (tensor, dim)}`` for the MoE widths of ``block``: the fused experts' neurons (the
    ``I`` of a 3-D ``down_proj`` [E, H, I], [E, I, H] when ``is_transposed``) and a shared expert's."""
    out: dict[str, tuple[torch.Tensor, int]] = {}
    for _, m in block.named_modules():
        down = m.__dict__.get("_parameters", {}).get("down_proj")
        if isinstance(down, torch.Tensor) and down.dim() == 3:
            out["experts_intermediate"] = (down, 1 if getattr(m, "is_transposed", False) else 2)
            break
    shared = _find(block, _MLP_IN, shared=True)
    if shared is not None:
        out["shared_intermediate"] = (shared[1].weight, 0)
    return out


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(qualified name, block)]`` of every transformer block (children of a ModuleList holding
    an attention or MLP projection)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and all(type(c) is type(m[0]) for c in m):
            if _find(m[0], _Q) is not None or _find(m[0], _MLP_IN) is not None:
                out += [(f"{name}.{i}", c) for i, c in enumerate(m)]
    return out


def layer_widths(model: nn.Module, config=None) -> dict[str, dict[str, int]]:
    """``{block name: {"heads", "kv_heads", "intermediate", MoE kinds: width}}`` read from the tensors."""
    config = config if config is not None else model.config
    hd = head_dim_of(config)
    out = {}
    for name, block in blocks(model):
        w: dict[str, int] = {}
        q = _find(block, _Q)
        if q is not None:
            n = _out_width(q[1])
            w["heads"] = (n // 3 if q[0].endswith("c_attn") else n) // hd
        k = _find(block, _K)
        if k is not None and _config_name(config, "kv_heads"):
            w["kv_heads"] = _out_width(k[1]) // hd
        mlp = _find(block, _MLP_IN)
        if mlp is not None:
            w["intermediate"] = _out_width(mlp[1])
        for kind, (tensor, dim) in moe_widths(block).items():
            w[kind] = int(tensor.shape[dim])
        out[name] = w
    return out


def hidden_tensor(model: nn.Module) -> tuple[torch.Tensor, int] | None:
    """``(weight, dim)`` holding the hidden size at the input: a token table's columns, or the output
    of the first conv / linear inside a patch embedding (ViT)."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if isinstance(emb, nn.Embedding):
        return emb.weight, 1
    for m in (emb.modules() if isinstance(emb, nn.Module) else ()):
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            return m.weight, 0
    return None


def _hidden_width(model: nn.Module) -> int | None:
    found = hidden_tensor(model)
    return int(found[0].shape[found[1]]) if found is not None else None


def _meta_model(model: nn.Module, config) -> nn.Module:
    """A model of ``model``'s class built from ``config`` on the meta device (no memory, no init)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type(model)(config)


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _first_difference(a: dict, b: dict) -> str:
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return f"{k}: pruned {a.get(k)}, config gives {b.get(k)}"
    return ""


def _copy_scalars(dst: nn.Module, src: nn.Module, prefix: str = "", exact: bool = False) -> None:
    """Copy the int/float attributes (and int tuples) of every module of ``src`` under ``prefix``
    (only ``prefix`` itself when ``exact``) onto the same-named module of ``dst``: what ``__init__``
    derived from the config."""
    for name, s in src.named_modules():
        if prefix and not (name == prefix or (not exact and name.startswith(prefix + "."))):
            continue
        try:
            d = dst.get_submodule(name)
        except AttributeError:
            continue
        for key, v in vars(s).items():
            if key.startswith("_") or key == "training" or isinstance(v, bool):
                continue
            scalar = isinstance(v, (int, float)) or (isinstance(v, tuple) and all(isinstance(i, int) for i in v))
            if scalar and getattr(d, key, None) != v:
                setattr(d, key, v)


def _with_widths(config, widths: dict[str, int]):
    cfg = copy.deepcopy(config)
    for kind, value in widths.items():
        name = _config_name(cfg, kind)
        if name is not None:
            setattr(cfg, name, int(value))
    return cfg


def _invalid(config) -> str:
    """The config's own validation error for its values, as one line ("" when valid)."""
    check = getattr(config, "validate", None)
    if check is None:
        return ""
    try:
        check()
    except Exception as exc:  # transformers wraps the ValueError of its validators
        cause = exc.__cause__ or exc
        return str(cause).strip().splitlines()[-1].strip() if str(cause).strip() else type(cause).__name__
    return ""


def _refuse_save(reason: str, per_layer: bool):
    keep = "use surgery.hf.save_pruned(model, path) and surgery.hf.load_pruned(path)"
    if per_layer:
        hint = f"plan with policy='uniform', or {keep}"
    else:  # one width per kind, but not one this config class can describe
        hint = f"the module runs as it is: {keep}"

    def save_pretrained(self, *args, **kwargs):
        raise NonUniformWidths(f"cannot save_pretrained: {reason}; {hint}")
    return save_pretrained


def sync_config(model: nn.Module, original: nn.Module | None = None) -> str:
    """Update ``model`` (a pruned copy, changed in place) so its config and modules describe its widths.

    Returns ``""`` when a stock config describes the model exactly, else the reason (the model still
    runs, ``save_pretrained`` then raises :class:`NonUniformWidths`)."""
    config = model.config
    before = getattr(original, "config", config)
    grant_bias_flags(model, config)  # a compensation bias on o_proj / down_proj: attention_bias / mlp_bias
    widths = layer_widths(model, before)
    hidden = _hidden_width(model)
    common: dict[str, int] = {"head_dim": head_dim_of(before)}
    if hidden is not None and _config_name(config, "hidden"):
        common["hidden"] = int(hidden)
    kinds = sorted({k for w in widths.values() for k in w})
    per_kind = {k: [w.get(k) for w in widths.values()] for k in kinds}
    uneven = {k: v for k, v in per_kind.items() if len(set(v)) > 1}
    if not uneven:
        uniform = {**common, **{k: v[0] for k, v in per_kind.items() if v}}
        cfg = _with_widths(config, uniform)
        if _config_name(cfg, "head_dim") is None and "hidden" in uniform and "heads" in uniform:
            if uniform["hidden"] != uniform["heads"] * common["head_dim"]:
                return _non_expressible(model, config, widths, common,
                                        f"this config ties head_dim to hidden_size / heads "
                                        f"({uniform['hidden']} / {uniform['heads']} != {common['head_dim']})")
        invalid = _invalid(cfg)
        if invalid:
            return _non_expressible(model, config, widths, common, f"the config rejects these widths ({invalid})")
        try:
            fresh = _meta_model(model, cfg)
        except Exception as exc:  # the class's own checks (GPT-2: embed_dim % num_heads)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return _non_expressible(model, config, widths, common, f"{type(model).__name__} rejects these widths ({first})")
        diff = _first_difference(_shapes(model), _shapes(fresh))
        if not diff and "hidden" in common:  # also on a rebuilt model: its recorded factor
            scale = _fold_embed_scale(model, _hidden_of(before), common["hidden"])
            if scale:
                return _non_expressible(model, config, widths, common, scale)
        if not diff:
            for key, value in cfg.to_dict().items():
                if key in config.to_dict() and getattr(config, key, None) != value:
                    setattr(config, key, getattr(cfg, key))
            _copy_scalars(model, fresh)
            config.__dict__.pop("surgery_cannot_save", None)  # a stock config describes it (again)
            return ""
        return _non_expressible(model, config, widths, common, f"the config cannot describe the pruned shapes ({diff})")
    shown = "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in uneven.items())
    return _non_expressible(model, config, widths, common, f"widths differ between layers ({shown})")


def _hidden_of(config) -> int | None:
    name = _config_name(config, "hidden")
    return int(getattr(config, name)) if name else None


def _fold_embed_scale(model: nn.Module, old_hidden: int | None, new_hidden: int) -> str:
    """Gemma-style token embeddings multiply by ``sqrt(hidden_size)``, a value the class derives from
    the config, not stored with the weights. When the hidden size shrinks, the pruned model must keep
    computing with the old factor: folded into an untied table (weight x old / new, factor set to new,
    so a config with the new hidden size rebuilds it exactly). Returns the reason when the table is
    tied to the output layer (then the factor is kept as it is and recorded in the config)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    scale = getattr(emb, "embed_scale", None)
    recorded = getattr(model.config, "surgery_embed_scale", None)
    if scale is not None and recorded is not None and not math.isclose(float(recorded), float(new_hidden) ** 0.5):
        return (f"{type(model).__name__} multiplies its token embeddings by {float(recorded):g} (recorded), not "
                f"sqrt(hidden_size), and ties them to the output layer")  # a model load_pruned rebuilt
    if scale is None or old_hidden is None or old_hidden == new_hidden:
        return ""
    old, new = float(scale), float(new_hidden) ** 0.5
    if not math.isclose(old, float(old_hidden) ** 0.5, rel_tol=1e-6):
        return ""  # not derived from the hidden size
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is emb.weight:
        model.config.surgery_embed_scale = old
        return (f"{type(model).__name__} multiplies its token embeddings by sqrt(hidden_size) ({old:g}; the pruned "
                f"hidden size gives {new:g}) and ties them to the output layer, so the factor cannot be folded into the table")
    with torch.no_grad():
        emb.weight = nn.Parameter(emb.weight.detach() * (old / new), requires_grad=emb.weight.requires_grad)
    _set_embed_scale(emb, new)
    return ""


def _set_embed_scale(emb: nn.Module, value: float) -> None:
    """The factor as the embedding holds it: a 0-d buffer or a float (and Gemma's float copy)."""
    scale = emb.embed_scale
    emb.embed_scale = torch.tensor(value, dtype=scale.dtype) if isinstance(scale, torch.Tensor) else value
    if hasattr(emb, "scalar_embed_scale"):
        emb.scalar_embed_scale = value


def restore_embed_scale(model: nn.Module) -> None:
    """Give a model rebuilt from a config that records ``surgery_embed_scale`` that factor back."""
    old = getattr(model.config, "surgery_embed_scale", None)
    emb = model.get_input_embeddings() if old is not None else None
    if getattr(emb, "embed_scale", None) is not None:
        _set_embed_scale(emb, float(old))


def guard_save(model: nn.Module) -> None:
    """Make ``save_pretrained`` of ``model`` raise :class:`NonUniformWidths` when its config records
    that no stock config describes it (``config.surgery_cannot_save``, set when it was pruned; a
    checkpoint that rebuilds the model calls this again, the guard itself is not stored)."""
    reason = getattr(getattr(model, "config", None), "surgery_cannot_save", None)
    if isinstance(reason, str) and reason:
        per_layer = reason.startswith("widths differ between layers")
        model.save_pretrained = types.MethodType(_refuse_save(reason, per_layer), model)


def is_save_guard(value) -> bool:
    """Whether ``value`` is the ``save_pretrained`` guard :func:`guard_save` installs."""
    return isinstance(value, types.MethodType) and getattr(value.__func__, "__module__", "") == __name__


def _fit_conv1d(model: nn.Module) -> None:
    """GPT-2's ``Conv1D`` keeps its output width as ``nf``: take it from its (in, out) weight."""
    for m in model.modules():
        w = getattr(m, "weight", None)
        if type(m).__name__ == "Conv1D" and isinstance(getattr(m, "nf", None), int) and isinstance(w, torch.Tensor) and w.dim() == 2:
            m.nf = int(w.shape[1])


def _non_expressible(model, config, widths, common, reason: str) -> str:
    """Give each block the attributes of a model built with its own widths; record and guard."""
    first = next(iter(widths.values()), {})
    _copy_scalars(model, _meta_model(model, _with_widths(config, {**common, **first})))
    tied = _config_name(config, "head_dim") is None  # BERT, ViT, GPT-2: head size = hidden / heads
    for name, w in widths.items():
        fresh = _meta_model(model, _with_widths(config, {**common, **w}))
        _copy_scalars(model, fresh, prefix=name)
        q = _find(model.get_submodule(name), _Q)
        if tied and q is not None and "heads" in w:
            # the attention module alone, from a config whose hidden size is its heads x head size
            attn = f"{name}.{q[0]}".rpartition(".")[0]
            inner = _with_widths(config, {**w, "hidden": w["heads"] * common["head_dim"]})
            _copy_scalars(model, _meta_model(model, inner), prefix=attn, exact=True)
    _fit_conv1d(model)  # the attention module's own projections keep their real widths
    if "hidden" in common:
        _fold_embed_scale(model, _hidden_of(config), common["hidden"])
        restore_embed_scale(model)  # tied: the factor the model computed with
        name = _config_name(config, "hidden")
        setattr(config, name, common["hidden"])
    config.surgery_layer_widths = {k: dict(v) for k, v in widths.items()}
    config.surgery_head_dim = int(common["head_dim"])
    config.surgery_cannot_save = reason
    guard_save(model)
    warnings.warn(f"surgery: a stock {type(config).__name__} cannot hold this pruned model: {reason}; "
                  f"the model runs, save_pretrained refuses (use policy='uniform' or surgery.hf.save_pruned)", stacklevel=3)
    return reason
