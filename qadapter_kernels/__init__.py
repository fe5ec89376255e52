"""qadapter-kernels: fused, memory-frugal Q-Adapter losses and combined-policy inference.

Public API::

    qadapter_loss(base_hidden, q_hidden, weight, labels, ...) -> QAdapterLossOutput
    QAdapterLoss(...)                        # nn.Module holding the options
    LossConfig(...)                          # the loss options, validated; their defaults
    combined_logprobs(base_hidden, q_hidden, weight, ...)   # log pi~ from hidden states
    combine_logits(base_logits, q_values, ...)              # log pi~ from logits
    backends()                               # which backends run here, and why not
    grad_filter_report()                     # context manager: what grad_filter_eps left out

Building blocks for other losses and trainers (same inputs, same backends, no [B, T, V] logits)::

    qadapter_token_stats(base_hidden, q_hidden, weight, labels, ...) -> TokenStats
                                             # per scored token: Q[t, a_t], V_t, r_t, rows, positions
    sequence_rewards(stats)                  # [B] per-sequence rewards R_i
    bt_terms(sequence_rewards)               # [K] per-pair Bradley-Terry terms
    combined_logprobs_at(base_hidden, q_hidden, weight, targets, ...) -> TargetLogprobs
                                             # log pi~ (differentiable) and log pi1 of given targets

Measuring a customized policy (gradient-free, one pass over the vocabulary per chunk of tokens)::

    vocabulary_pass(base_hidden, q_hidden, weight, targets, config=..., measures=...) -> TokenMeasures
                                             # token statistics (learned and step-0), log pi~ and
                                             # log pi1 of targets, KL to the base, greedy tokens
    token_logprobs(hidden, weight, targets, logit_softcap=...)   # one plain model's log-probs of targets

A vocabulary-parallel head (each rank of a process group holds a range of the head's rows)::

    vocab_shard(V, group)                    # this rank's rows under torch.tensor_split's split
    qadapter_loss(..., group=group, vocab_start=rows.start)      # also qadapter_token_stats, QAdapterLoss,
                                                                 # combined_logprobs_at; or a DTensor head
    combined_logprobs(..., group=group), combine_logits(..., group=group)   # this rank's columns of log pi~
"""

from .combine import TargetLogprobs, combine_logits, combined_logprobs, combined_logprobs_at
from .config import LossConfig
from .grad_filter import GradFilterReport, grad_filter_report
from .loss import QAdapterLoss, qadapter_loss, qadapter_token_stats
from .pairwise import QAdapterLossOutput, TokenStats, bt_terms, sequence_rewards
from .registry import BackendStatus, backends
from .vocab_parallel import vocab_shard
from .vocabulary import TokenMeasures, token_logprobs, vocabulary_pass

__all__ = [
    "BackendStatus",
    "GradFilterReport",
    "LossConfig",
    "QAdapterLoss",
    "QAdapterLossOutput",
    "TargetLogprobs",
    "TokenMeasures",
    "TokenStats",
    "backends",
    "bt_terms",
    "combine_logits",
    "combined_logprobs",
    "combined_logprobs_at",
    "grad_filter_report",
    "qadapter_loss",
    "qadapter_token_stats",
    "sequence_rewards",
    "token_logprobs",
    "vocab_shard",
    "vocabulary_pass",
]
__version__ = "0.1.0"
