"""Op rules. Importing this package registers every rule in ``_registry``."""

from . import attention, casts, conv, conv_transpose, elementwise, linear, norm, pooling, reduce, rnn  # noqa: F401
from . import repeat, shape, slicing, stripe, torchvision_ops, torchvision_video, weight_norm  # noqa: F401
from . import aten  # noqa: F401,E402  (reuses the rules above)
from . import transformer  # noqa: F401,E402  (attention, addmm, export's sub-graphs)
from . import moe  # noqa: F401,E402  (experts' grouped matmul, a custom op registered by name)
from ._registry import OpRule, function_rule, lookup, method_rule, module_rule

__all__ = ["OpRule", "function_rule", "lookup", "method_rule", "module_rule"]
