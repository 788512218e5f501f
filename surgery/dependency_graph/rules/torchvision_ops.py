"""torchvision functions that fx keeps as calls (``torch.fx.wrap``) and are elementwise per channel."""

from __future__ import annotations

from ..context import BuildCtx
from ._registry import function_rule, module_rule
from .common import unary

try:  # torchvision is optional at load time (a saved checkpoint reloads without it)
    from torchvision.ops import stochastic_depth as _sd_function
    from torchvision.ops.stochastic_depth import StochasticDepth
except ImportError:  # pragma: no cover
    _sd_function = StochasticDepth = None


def stochastic_depth(ctx: BuildCtx) -> None:
    """Drops whole samples (rows), so channels map one to one."""
    unary(ctx)


if StochasticDepth is not None:
    function_rule(_sd_function)(stochastic_depth)
    module_rule(StochasticDepth)(stochastic_depth)
