"""torchvision functions that fx keeps as calls (``torch.fx.wrap``) and are elementwise per channel."""

from __future__ import annotations

from torchvision.ops import stochastic_depth as _sd_module
from torchvision.ops.stochastic_depth import StochasticDepth

from ..context import BuildCtx
from ._registry import function_rule, module_rule
from .common import unary


@function_rule(_sd_module)
@module_rule(StochasticDepth)
def stochastic_depth(ctx: BuildCtx) -> None:
    """Drops whole samples (rows), so channels map one to one."""
    unary(ctx)
