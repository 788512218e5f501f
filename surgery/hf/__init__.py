"""Hugging Face models in and out: a pruned ``transformers.PreTrainedModel`` stays one.

* :func:`sync_config` (called by the module-tree rewrite) writes the new widths into the copy's
  ``config`` and sets every attribute its modules derive from the config (``num_key_value_groups``,
  GPT-2's ``split_size``, ...), so ``generate``, any batch size / sequence length and
  ``save_pretrained`` + ``from_pretrained`` work. Widths that differ between layers cannot be held by
  a stock config: the module still runs, a warning says why, and ``save_pretrained`` refuses
  (:func:`save_pruned` / :func:`load_pruned` keep such a model).
* :func:`perplexity`: sliding fixed windows over a text's token ids.
* :func:`remove_layers` drops whole blocks (depth pruning): ``layer_idx`` renumbered, the layer count
  and per-layer config lists (``layer_types``) follow, so ``generate`` and ``save_pretrained`` work;
  :func:`layer_importance` ranks blocks by ShortGPT's block influence.

``transformers`` is imported only when a model is one of its classes (extra ``surgery[hf]``).
"""

from .config import NonUniformWidths, is_hf_model, layer_widths, sync_config
from .layers import layer_importance, remove_layers
from .perplexity import perplexity
from .saving import load_pruned, save_pruned

__all__ = ["NonUniformWidths", "is_hf_model", "layer_importance", "layer_widths", "load_pruned", "perplexity", "remove_layers", "save_pruned", "sync_config"]
