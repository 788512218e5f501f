"""fx's failure on Hugging Face v5 models is reported for what it is, not as a leaf-module hint."""

from __future__ import annotations

import pytest

from surgery.dependency_graph.tracing import _symbolic_trace
from surgery.errors import TraceError

pytest.importorskip("transformers", reason="the tiny models come from transformers (pip install -e '.[hf]')")
from hf_models import tiny_llama  # noqa: E402


def test_fx_failure_on_a_kwargs_forward_names_the_cause_and_the_export_front_end():
    with pytest.raises(TraceError) as info:
        _symbolic_trace(tiny_llama(), ())
    text = str(info.value)
    assert text == ("cannot trace LlamaForCausalLM: torch.fx cannot enter a forward that takes **kwargs (as Hugging Face "
                    "models do), and no leaf module can help; the torch.export front end traces it instead")
