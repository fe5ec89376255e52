"""qadapter-kernels: fused, memory-frugal Q-Adapter losses and combined-policy inference.

Public API::

    qadapter_loss(base_hidden, q_hidden, weight, labels, ...) -> QAdapterLossOutput
    QAdapterLoss(...)                        # nn.Module holding the options
    LossConfig(...)                          # the loss options, validated; their defaults
    combined_logprobs(base_hidden, q_hidden, weight, ...)   # log pi~ from hidden states
    combine_logits(base_logits, q_values, ...)              # log pi~ from logits
    backends()                               # which backends run here, and why not
"""

from .registry import BackendStatus, backends
from .combine import combine_logits, combined_logprobs
from .config import LossConfig
from .loss import QAdapterLoss, qadapter_loss
from .pairwise import QAdapterLossOutput

__all__ = [
    "BackendStatus",
    "LossConfig",
    "QAdapterLoss",
    "QAdapterLossOutput",
    "backends",
    "combine_logits",
    "combined_logprobs",
    "qadapter_loss",
]
__version__ = "0.1.0"
