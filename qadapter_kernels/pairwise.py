"""The light half of the loss, written once: per-token rewards from the token statistics, then
per-sequence rewards, the chosen/rejected pairing, Bradley-Terry and chi2 (docs/design.md,
"The loss").

Rewards stay packed, one entry per scored token in row order, from the token statistics to the
loss; :class:`ScoredTokens` says where each entry sits. Autograd carries the loss gradient back to
the per-token statistics (``g_a`` and ``g_v`` of docs/design.md, "The gradient in closed form").
:class:`TokenStats`, :func:`sequence_rewards` and :func:`bt_terms` are the same pieces as public
building blocks for other losses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .config import LossConfig


class QAdapterLossOutput(NamedTuple):
    """Result of :func:`qadapter_loss`. Only ``loss`` carries a gradient."""

    loss: torch.Tensor
    bt_loss: torch.Tensor
    chi2_loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor


class ScoredTokens(NamedTuple):
    """Where the packed scored tokens sit. Position ``t`` of row ``b`` is scored by ``labels[b, t+1]``."""

    mask: torch.Tensor  # [B, T-1] bool: position scored
    rows: torch.Tensor  # [N] int64: the row of each packed token
    counts: torch.Tensor  # [B] int64: scored tokens per row
    next_scored: torch.Tensor  # [N] bool: position t+1 of the same row is scored (the next packed token)

    @classmethod
    def from_labels(cls, labels: torch.Tensor, ignore_index: int) -> ScoredTokens:
        return cls.from_mask(labels[:, 1:] != ignore_index)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> ScoredTokens:
        rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]
        next_scored = F.pad(mask[:, 1:], (0, 1), value=False)[mask]
        return cls(mask, rows, mask.sum(dim=1), next_scored)

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def padded_len(self) -> int:
        """``T - 1``: the length the ``padded`` reward norm divides by."""
        return self.mask.shape[1]

    @property
    def positions(self) -> torch.Tensor:
        """``[N]`` int64: the position ``t`` of each packed token (its action is ``labels[row, t+1]``)."""
        return torch.arange(self.padded_len, device=self.mask.device).expand_as(self.mask)[self.mask]


class TokenStats(NamedTuple):
    """Per-token statistics of the scored tokens, packed in row order (:func:`qadapter_token_stats`).

    ``q_taken``, ``value`` and ``rewards`` are ``[N]`` (float32, float64 for float64 inputs) and
    carry gradients to ``q_hidden`` and a trainable Q head, so other losses can be built on them;
    :func:`sequence_rewards` and :func:`bt_terms` give the Q-Adapter loss's own per-sequence and
    per-pair terms. ``rows``/``positions`` say where each entry sits.
    """

    q_taken: torch.Tensor  # [N] Q[t, a_t]
    value: torch.Tensor  # [N] soft value V_t = alpha~ * lse((Q_t + alpha_0 * log pi1_t) / alpha~)
    rewards: torch.Tensor  # [N] r_t, with config.value_at and config.gamma
    tokens: ScoredTokens
    config: LossConfig  # the options the statistics and rewards were computed with

    @property
    def rows(self) -> torch.Tensor:
        """``[N]`` int64: the batch row of each packed token."""
        return self.tokens.rows

    @property
    def positions(self) -> torch.Tensor:
        """``[N]`` int64: the position ``t`` of each packed token; its action is ``labels[row, t+1]``."""
        return self.tokens.positions


def token_rewards(q_taken: torch.Tensor, value: torch.Tensor, tokens: ScoredTokens, config: LossConfig) -> torch.Tensor:
    """Packed per-token rewards ``r_t = Q[t, a_t] - gamma * V`` (``V_t``, or ``V_{t+1}`` when ``t+1`` is scored)."""
    if config.value_at == "current":
        return q_taken - config.gamma * value
    next_value = torch.where(tokens.next_scored, value.roll(-1), torch.zeros_like(value))
    return q_taken - config.gamma * next_value


def _sequence_rewards(rewards: torch.Tensor, tokens: ScoredTokens, reward_norm: str) -> torch.Tensor:
    sums = torch.zeros(tokens.batch, dtype=rewards.dtype, device=rewards.device).index_add(0, tokens.rows, rewards)
    if reward_norm == "padded":
        return sums / tokens.padded_len
    if reward_norm == "mean":
        return sums / tokens.counts.clamp(min=1).to(sums.dtype)
    return sums


def sequence_rewards(stats: TokenStats) -> torch.Tensor:
    """``[B]`` per-sequence rewards ``R_i``: each row's token rewards summed and divided as
    ``stats.config.reward_norm`` says (docs/design.md, "The loss"); 0 for a row with no scored token."""
    if not isinstance(stats, TokenStats):
        raise TypeError(f"stats must be the TokenStats of qadapter_token_stats, got {type(stats).__name__}")
    return _sequence_rewards(stats.rewards, stats.tokens, stats.config.reward_norm)


def bt_terms(sequence_rewards: torch.Tensor) -> torch.Tensor:
    """``[K]`` Bradley-Terry terms ``softplus(R_{k+K} - R_k) = -log sigmoid(R_k - R_{k+K})`` of ``[B]``
    per-sequence rewards, ``B = 2K``: rows ``0..K-1`` chosen, row ``k + K`` the rejected one of pair ``k``."""
    if not isinstance(sequence_rewards, torch.Tensor):
        raise TypeError(f"sequence_rewards must be a torch.Tensor, got {type(sequence_rewards).__name__}")
    if sequence_rewards.dim() != 1 or sequence_rewards.shape[0] == 0 or sequence_rewards.shape[0] % 2:
        raise ValueError("sequence_rewards must be [B] with B even and > 0 (chosen rows, then their rejected rows); "
                         f"got shape {tuple(sequence_rewards.shape)}")
    half = sequence_rewards.shape[0] // 2
    return F.softplus(sequence_rewards[half:] - sequence_rewards[:half])


def pairwise_loss(rewards: torch.Tensor, tokens: ScoredTokens, config: LossConfig) -> QAdapterLossOutput:
    """BT + chi2 from packed per-token rewards."""
    seq_rewards = _sequence_rewards(rewards, tokens, config.reward_norm)
    half = tokens.batch // 2
    bt = bt_terms(seq_rewards).mean()
    chi2 = config.beta * rewards.square().sum() / rewards.shape[0]
    return loss_output(bt + chi2, bt, chi2, seq_rewards[:half], seq_rewards[half:])


def share_of_total(
    pairwise: Callable, rewards: torch.Tensor, tokens: ScoredTokens, config: LossConfig, total_pairs: int, total_tokens: int
) -> QAdapterLossOutput:
    """This batch's share of the loss of a larger batch it is part of (accumulated micro-batches,
    data-parallel ranks): its pairs' BT terms over ``total_pairs`` plus ``beta`` times its squared
    rewards over ``total_tokens``. The shares of the parts add up to the loss of the whole.

    Written as ``pair_share * loss(beta * token_share / pair_share)``, so every backend's pairwise
    kernel serves it unchanged. ``bt_loss`` and ``chi2_loss`` stay this batch's own means.
    """
    pair_share = (tokens.batch // 2) / total_pairs
    token_share = rewards.shape[0] / total_tokens
    out = pairwise(rewards, tokens, dataclasses.replace(config, beta=config.beta * token_share / pair_share))
    chi2 = out.chi2_loss * (pair_share / token_share) if token_share else out.chi2_loss
    return out._replace(loss=out.loss * pair_share, chi2_loss=chi2)


def loss_output(loss, bt, chi2, chosen, rejected) -> QAdapterLossOutput:
    """The output record: ``loss`` keeps its gradient; the terms, rewards and metrics are detached."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return QAdapterLossOutput(
        loss=loss,
        bt_loss=bt.detach(),
        chi2_loss=chi2.detach(),
        chosen_rewards=chosen,
        rejected_rewards=rejected,
        accuracy=(chosen > rejected).to(chosen.dtype).mean(),
        margin=(chosen - rejected).mean(),
    )
