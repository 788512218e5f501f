"""Hugging Face models in and out: a pruned ``transformers.PreTrainedModel`` stays one.

* :func:`sync_config` (called by the module-tree rewrite) writes the new widths into the copy's
  ``config`` and sets every attribute its modules derive from the config (``num_key_value_groups``,
  GPT-2's ``split_size``, ...), so ``generate``, any batch size / sequence length and
  ``save_pretrained`` + ``from_pretrained`` work. Widths that differ between layers cannot be held by
  a stock config: the module still runs, ``meta``/warning say why, and ``save_pretrained`` refuses
  (use :func:`surgery.save`).
* :func:`perplexity`: sliding fixed windows over a text's token ids.

``transformers`` is imported only when a model is one of its classes (extra ``surgery[hf]``).
"""

from .config import NonUniformWidths, is_hf_model, layer_widths, sync_config
from .perplexity import perplexity

__all__ = ["NonUniformWidths", "is_hf_model", "layer_widths", "perplexity", "sync_config"]
