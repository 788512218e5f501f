"""Model statistics: parameter count, MACs of one forward pass, and optional CPU latency.

MACs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` while the forward runs on
fake tensors (:class:`torch._subclasses.fake_tensor.FakeTensorMode`), so a 100-GFLOP model is
measured without doing 100 GFLOPs of work. Fused attention kernels that FlopCounterMode has no
formula for (``nn.MultiheadAttention``'s and ``nn.TransformerEncoderLayer``'s fast paths, the CPU
flash kernel of ``F.scaled_dot_product_attention``) are counted too: projections, ``q k^T`` and
``attn v``. The model passed in is never mutated: its parameters
stay where they are and every module's training flag is restored.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from .dependency_graph.tracing import eval_mode, normalize_inputs
from .errors import TraceError

__all__ = ["ModelStats", "stats", "Sparsity", "weight_sparsity"]


@dataclass(frozen=True)
class ModelStats:
    """Size and cost of a model: ``params`` elements, ``macs`` per forward, ``latency_ms`` if timed."""

    params: int
    macs: int
    latency_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        text = f"{self.params / 1e6:.2f} M params, {self.macs / 1e9:.2f} GMACs"
        if self.latency_ms is not None:
            text += f", {self.latency_ms:.2f} ms"
        return text


# -- attention kernels FlopCounterMode has no formula for ----------------------------------------
# Formulas receive tensor shapes (FlopCounterMode's shape_wrapper) and return FLOPs (2 per MAC).


def _attention_macs(q: tuple, k: tuple, v: tuple) -> int:
    """``softmax(q k^T) v`` on (..., L, E) / (..., S, E) / (..., S, Ev): the q's leading dims batch."""
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * _attention_macs(tuple(query), tuple(key), tuple(value))


def _heads(shape: tuple, heads: int) -> tuple:
    """(B, L, E) or (L, E) -> (B, heads, L, E // heads)."""
    b = shape[0] if len(shape) == 3 else 1
    return b, heads, shape[-2], shape[-1] // heads


def _native_mha_flops(query, key, value, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight, *args,
                      out_shape=None, **kwargs) -> int:
    """``nn.MultiheadAttention``'s fast path: in-projections, ``q k^T``, ``attn v``, out-projection."""
    rows_q = math.prod(query[:-1])
    rows_kv = math.prod(key[:-1])
    e_in, e = qkv_weight[1], qkv_weight[0] // 3
    macs = rows_q * e_in * e + 2 * rows_kv * e_in * e  # q, k, v projections
    q, k = _heads(tuple(query[:-1]) + (e,), num_head), _heads(tuple(key[:-1]) + (e,), num_head)
    macs += _attention_macs(q, k, k)
    macs += rows_q * proj_weight[1] * proj_weight[0]
    return 2 * macs


def _encoder_layer_flops(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu,
                         norm_first, eps, nw1, nb1, nw2, nb2, ffn_weight_1, ffn_bias_1, ffn_weight_2, *args,
                         out_shape=None, **kwargs) -> int:
    """``nn.TransformerEncoderLayer``'s fast path: self-attention plus the two feed-forward Linears."""
    rows = math.prod(src[:-1])
    ffn = rows * (ffn_weight_1[0] * ffn_weight_1[1] + ffn_weight_2[0] * ffn_weight_2[1])
    return _native_mha_flops(src, src, src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight) + 2 * ffn


def _attention_mapping() -> dict:
    aten = torch.ops.aten
    formulas = {
        "_native_multi_head_attention": _native_mha_flops,
        "_transformer_encoder_layer_fwd": _encoder_layer_flops,
        "_scaled_dot_product_flash_attention_for_cpu": _sdpa_flops,
        "_scaled_dot_product_fused_attention_overrideable": _sdpa_flops,
    }
    return {getattr(aten, name): f for name, f in formulas.items() if hasattr(aten, name)}


_ATTENTION_FLOPS = _attention_mapping()


def _counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=_ATTENTION_FLOPS)


def _one_line(exc: BaseException) -> str:
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _count_macs(model: nn.Module, inputs: tuple) -> int:
    """MACs of one forward pass on fake copies of the model's tensors; real run only as a fallback."""
    counter = _counter()
    try:
        # Fake mode fails on data-dependent shapes (nonzero, .item() control flow): the fallback runs for real.
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            tensors = {**dict(model.named_parameters(remove_duplicate=False)),
                       **dict(model.named_buffers(remove_duplicate=False))}
            fake_state = {name: mode.from_tensor(t) for name, t in tensors.items()}
            fake_inputs = tuple(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs)
            with torch.no_grad(), counter:
                functional_call(model, fake_state, fake_inputs)
    except Exception:
        counter = _counter()
        try:
            with torch.no_grad(), counter:
                model(*inputs)
        except Exception as exc:
            raise TraceError(f"model does not run on these inputs: {_one_line(exc)}") from exc
    return int(counter.get_total_flops()) // 2  # FlopCounterMode counts one MAC as two FLOPs


def _latency_ms(model: nn.Module, inputs: tuple, runs: int) -> float:
    times = []
    with torch.inference_mode():
        for i in range(2 + runs):
            start = time.perf_counter()
            model(*inputs)
            if i >= 2:
                times.append((time.perf_counter() - start) * 1e3)
    return float(statistics.median(times))


def stats(model: nn.Module, example_inputs: Any, latency: bool = False, runs: int = 10) -> ModelStats:
    """Count parameters and MACs of ``model`` on ``example_inputs`` (optionally time it on CPU).

    ``example_inputs`` is a tensor or a tuple of tensors. MACs come from a forward pass on fake
    tensors, in eval mode. With ``latency=True`` the model is run for real: the median of ``runs``
    timed passes after two warm-up passes, in eval mode under ``torch.inference_mode()``.

    >>> import torch, surgery
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))
    >>> s = surgery.stats(net, torch.randn(1, 3, 4, 4))
    >>> (s.params, s.macs)
    (1514, 4736)
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    inputs = normalize_inputs(example_inputs)
    params = sum(p.numel() for p in model.parameters())
    with eval_mode(model):
        macs = _count_macs(model, inputs)
        latency_ms = None
        if latency:
            try:
                latency_ms = _latency_ms(model, inputs, runs)
            except Exception as exc:
                raise TraceError(f"model does not run on these inputs: {_one_line(exc)}") from exc
    return ModelStats(params=params, macs=macs, latency_ms=latency_ms)


# -- sparsity (unstructured pruning) ------------------------------------------------------------
@dataclass(frozen=True)
class Sparsity:
    """Zero entries among all floating parameters and among the prunable (Linear/conv) weights."""

    params: int
    zeros: int
    prunable: int
    prunable_zeros: int

    @property
    def overall(self) -> float:
        """Share of zero parameters (0.0 for a model without parameters)."""
        return self.zeros / self.params if self.params else 0.0

    @property
    def of_prunable(self) -> float:
        """Share of zeros among Linear and convolution weights."""
        return self.prunable_zeros / self.prunable if self.prunable else 0.0


def weight_sparsity(model: nn.Module) -> Sparsity:
    """Count exact zeros in ``model``'s floating parameters (each shared tensor once).

    >>> net = torch.nn.Linear(4, 2)
    >>> with torch.no_grad():
    ...     _ = net.weight[0].zero_()
    >>> s = weight_sparsity(net)
    >>> (s.params, s.zeros, s.prunable, s.prunable_zeros, s.of_prunable)
    (10, 4, 8, 4, 0.5)
    """
    from .sparsity import prunable_weights

    params = [p for p in dict.fromkeys(model.parameters()) if p.is_floating_point()]
    prunable = list(prunable_weights(model).values())
    zeros = lambda ps: sum(int((p.detach() == 0).sum()) for p in ps)  # noqa: E731
    return Sparsity(sum(p.numel() for p in params), zeros(params), sum(p.numel() for p in prunable), zeros(prunable))
