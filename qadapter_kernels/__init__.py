"""qadapter-kernels: fused, memory-frugal Q-Adapter losses and combined-policy inference.

Public API::

    qadapter_loss(base_hidden, q_hidden, weight, labels, ...) -> QAdapterLossOutput
    QAdapterLoss(...)                        # nn.Module holding the hyper-parameters
    combined_logprobs(base_hidden, q_hidden, weight, ...)   # log pi~ from hidden states
    combine_logits(base_logits, q_values, ...)              # log pi~ from logits
    backends()                               # which backends run here, and why not
"""

from ._backends import BackendStatus, backends
from ._contract import QAdapterLossOutput
from .combine import combine_logits, combined_logprobs
from .loss import QAdapterLoss, qadapter_loss

__all__ = [
    "BackendStatus",
    "QAdapterLoss",
    "QAdapterLossOutput",
    "backends",
    "combine_logits",
    "combined_logprobs",
    "qadapter_loss",
]
__version__ = "0.1.0"
