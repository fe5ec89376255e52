"""Eager Q-Adapter loss that materializes the full logits: the executable spec.

Every other backend is tested against this file. It favours being obviously right over
being fast: it builds ``[B, T, V]`` logits, Q-values and the combined policy in float32
(or float64 when the inputs are float64) and lets autograd differentiate all of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import LossConfig
from .inputs import stats_dtype
from .pairwise import QAdapterLossOutput, ScoredTokens, pairwise_loss
from .registry import Backend, StatsOptions, require_exact_gradient


def _values(h_b, h_q, weight, wq, q_bias, alpha_tilde, alpha_0, softcap=None):
    """Q-values and soft values ``V = alpha~ lse((Q + alpha_0 log_softmax(z)) / alpha~)`` over whole
    rows; with ``softcap`` s, both heads' logits are first ``s * tanh(logits / s)``."""
    ct = stats_dtype(h_q.dtype)
    z = h_b.detach().to(ct) @ weight.detach().to(ct).T  # the frozen side: no gradient, ever
    q = h_q.to(ct) @ wq.to(ct).T
    if q_bias is not None:
        q = q + q_bias.to(ct)
    if softcap is not None:
        z, q = softcap * torch.tanh(z / softcap), softcap * torch.tanh(q / softcap)
    log_pi1 = torch.log_softmax(z, dim=-1)
    return q, alpha_tilde * _logsumexp((q + alpha_0 * log_pi1) / alpha_tilde)


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp over the vocabulary, NaN where a row holds ``+inf``: such a row has no finite
    normaliser, and the max-shifted form every kernel computes says NaN (``torch.logsumexp``
    alone would say ``+inf``), so a broken input looks the same whichever backend runs."""
    lse = torch.logsumexp(x, dim=-1)
    return torch.where(x.amax(dim=-1) == float("inf"), torch.full_like(lse, float("nan")), lse)


def qadapter_loss_reference(
    base_hidden: torch.Tensor,
    q_hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    q_weight: torch.Tensor | None,
    q_bias: torch.Tensor | None,
    config: LossConfig,
) -> QAdapterLossOutput:
    """docs/design.md, "The loss", line by line, over the whole ``[B, T, V]`` logits."""
    wq = weight.detach() if q_weight is None else q_weight  # the shared head stays frozen
    q, value = _values(base_hidden, q_hidden, weight, wq, q_bias, config.alpha_tilde, config.alpha_0,
                       config.logit_softcap)  # [B, T, V], [B, T]

    # Position t is scored by the target labels[t + 1] (Hugging Face alignment).
    targets = labels[:, 1:]
    mask = targets != config.ignore_index
    q_taken = q[:, :-1].gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if config.value_at == "current":
        soft_value = value[:, :-1]
    else:  # "next": V_{t+1}, counted only when t+1 is scored itself.
        next_mask = F.pad(mask[:, 1:], (0, 1), value=False)
        soft_value = torch.where(next_mask, value[:, 1:], torch.zeros_like(value[:, 1:]))
    rewards = torch.where(mask, q_taken - config.gamma * soft_value, torch.zeros_like(q_taken))
    return pairwise_loss(rewards[mask], ScoredTokens.from_labels(labels, config.ignore_index), config)


def reference_token_stats(base, hq, weight, q_weight, q_bias, targets, options: StatsOptions):
    """The ``token_stats`` contract with the whole ``[N, V]`` logits and plain autograd (nothing is
    chunked: ``options.chunk_size`` has nothing to bound)."""
    require_exact_gradient(options.grad_filter_eps, "reference")
    q, value = _values(base, hq, weight, q_weight, q_bias, options.alpha_tilde, options.alpha_0, options.logit_softcap)
    return q.gather(-1, targets.unsqueeze(-1)).squeeze(-1), value


BACKEND = Backend(
    name="reference",
    summary="eager, materializes the [N, V] logits: the executable spec",
    token_stats=reference_token_stats,
    availability=lambda: (True, ""),
    grad_filter=False,
)
