"""qadapter: the thin model and trainer layer over qadapter_kernels (Hugging Face transformers + PEFT).

Public API::

    QAdapterModel                 # a causal LM with a LoRA residual Q-function: loss, generate, save/load
    AdapterSet                    # many saved adapters over one frozen base: each row decodes its own policy
    QAdapterTrainer, QAdapterConfig   # transformers.Trainer and TrainingArguments for it
    PreferenceCollator            # tokenized pairs -> [chosen..., rejected...] batches with labels
    load_preference_data          # preference rows -> tokenized pairs

Building blocks for your own PEFT model and training loop (examples/ has runnable recipes)::

    frozen_and_adapter_hidden(model, input_ids, attention_mask) -> HiddenStates
                                  # (base_hidden, q_hidden, weight): qadapter_loss's first three arguments
    linear_head(model)            # the lm_head, checked to be one the fused loss models
    head_softcap(model)           # the model's logit soft cap (Gemma-2) or None: pass it to the loss
    full_weight(weight)           # a parameter whole (FSDP2 shards it as a DTensor, ZeRO-3 partitions it)

Names are imported on first use: ``import qadapter`` does not import transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "AdapterSet": "library.adapter_set",
    "QAdapterModel": "library.model",
    "QAdapterTrainer": "library.trainer",
    "QAdapterConfig": "library.trainer",
    "PreferenceCollator": "library.data",
    "load_preference_data": "library.data",
    "HiddenStates": "library.hidden",
    "frozen_and_adapter_hidden": "library.hidden",
    "linear_head": "library.hidden",
    "head_softcap": "library.hidden",
    "full_weight": "library.hidden",
}
__all__ = [
    "AdapterSet",
    "HiddenStates",
    "PreferenceCollator",
    "QAdapterConfig",
    "QAdapterModel",
    "QAdapterTrainer",
    "frozen_and_adapter_hidden",
    "full_weight",
    "head_softcap",
    "linear_head",
    "load_preference_data",
]

if TYPE_CHECKING:
    from .library.adapter_set import AdapterSet
    from .library.data import PreferenceCollator, load_preference_data
    from .library.hidden import HiddenStates, frozen_and_adapter_hidden, full_weight, head_softcap, linear_head
    from .library.model import QAdapterModel
    from .library.trainer import QAdapterConfig, QAdapterTrainer


if not TYPE_CHECKING:  # a type checker sees the names imported above, and only those

    def __getattr__(name: str):
        if name not in _EXPORTS:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
