"""Eager Q-Adapter loss that materializes the full logits: the executable spec.

Every other backend is tested against this file. It favours being obviously right over
being fast: it builds ``[B, T, V]`` logits, Q-values and the combined policy in float32
(or float64 when the inputs are float64) and lets autograd differentiate all of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._contract import LossConfig, QAdapterLossOutput, pairwise_loss


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def qadapter_loss_reference(
    base_hidden: torch.Tensor,
    q_hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    q_weight: torch.Tensor | None,
    q_bias: torch.Tensor | None,
    config: LossConfig,
) -> QAdapterLossOutput:
    """DESIGN section 2, line by line, over the whole ``[B, T, V]`` logits."""
    ct = _compute_dtype(q_hidden.dtype)
    wq = weight.detach() if q_weight is None else q_weight  # the shared head stays frozen
    # The frozen side: no gradient ever reaches base_hidden or weight.
    z = base_hidden.detach().to(ct) @ weight.detach().to(ct).T
    q = q_hidden.to(ct) @ wq.to(ct).T
    if q_bias is not None:
        q = q + q_bias.to(ct)
    log_pi1 = torch.log_softmax(z, dim=-1)
    value = config.alpha_tilde * torch.logsumexp(
        (q + config.alpha_0 * log_pi1) / config.alpha_tilde, dim=-1
    )  # [B, T]

    # Position t is scored by the action labels[t + 1] (Hugging Face alignment).
    actions = labels[:, 1:]
    mask = actions != config.ignore_index
    q_taken = q[:, :-1].gather(-1, actions.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if config.value_at == "current":
        soft_value = value[:, :-1]
    else:  # "next": V_{t+1}, counted only when t+1 is scored itself.
        next_mask = F.pad(mask[:, 1:], (0, 1), value=False)
        soft_value = torch.where(next_mask, value[:, 1:], torch.zeros_like(value[:, 1:]))
    token_rewards = torch.where(mask, q_taken - config.gamma * soft_value, torch.zeros_like(q_taken))
    return pairwise_loss(token_rewards, mask, config)


def backend_status() -> tuple[bool, str]:
    return True, ""
