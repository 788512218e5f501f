"""torchvision's video transformers: functions fx keeps as calls (``torch.fx.wrap``).

* MViT's ``_unsqueeze(x, target_dim, expand_dim)`` / ``_squeeze(x, target_dim, expand_dim, tensor_dim)``
  add or drop a dim of size 1 (a head dim for pooling); every other dim passes through, as for
  ``unsqueeze``/``squeeze``. ``_unsqueeze`` returns ``(x, rank)``.
* Swin3D's ``shifted_window_attention_3d`` and its ``_get_relative_position_bias``: the same
  couplings as the 2D Swin rules (``attention.py``): pruned by whole heads, ``num_heads`` rewritten.
"""

from __future__ import annotations

from ..context import BuildCtx
from ._registry import function_rule

try:  # torchvision is optional at load time (a saved checkpoint reloads without it)
    from torchvision.models.video import mvit as _mvit
    from torchvision.models.video import swin_transformer as _swin3d
except ImportError:  # pragma: no cover
    _mvit = _swin3d = None


def _rank_change(ctx: BuildCtx, expand_dim, out_path: tuple) -> None:
    """The input's dims pass to the output's, skipping ``expand_dim`` on the side that has one more."""
    x = ctx.input
    if not ctx.is_tensor(x) or not isinstance(expand_dim, int):
        return
    src, dst = ctx.val(x).dim(), ctx.out_val(out_path).dim()
    if dst == src:
        ctx.same_dims(x, out_path=out_path)
        return
    if abs(dst - src) != 1:
        return
    ins = [d for d in range(src) if src < dst or d != expand_dim % src]
    outs = [d for d in range(dst) if dst < src or d != expand_dim % dst]
    for i, o in zip(ins, outs, strict=True):
        ctx.identity(ctx.sp(x, i), ctx.out(o, out_path))


if _mvit is not None:

    @function_rule(_mvit._unsqueeze)
    def mvit_unsqueeze(ctx: BuildCtx) -> None:
        _rank_change(ctx, ctx.arg(2, "expand_dim"), (0,))

    @function_rule(_mvit._squeeze)
    def mvit_squeeze(ctx: BuildCtx) -> None:
        _rank_change(ctx, ctx.arg(2, "expand_dim"), ())


if _swin3d is not None:
    from .attention import _rewrite_swin_attention, swin_relative_position_bias, swin_window_attention

    function_rule(_swin3d._get_relative_position_bias)(swin_relative_position_bias)
    function_rule(_swin3d.shifted_window_attention_3d, rewrite=_rewrite_swin_attention)(swin_window_attention)
