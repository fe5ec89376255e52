"""The public Q-Adapter loss: checks, packing of the scored tokens, dispatch to a backend."""

from __future__ import annotations

import torch
from torch import nn

from . import _backends
from ._contract import LossConfig, QAdapterLossOutput, check_loss_inputs, token_rewards
from .reference import qadapter_loss_reference


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None (automatic); got {chunk_size!r}")


def _loss(base_hidden, q_hidden, weight, labels, q_weight, q_bias, config, backend, chunk_size):
    _check_chunk_size(chunk_size)
    check_loss_inputs(base_hidden, q_hidden, weight, labels, q_weight, q_bias, config)
    name = _backends.resolve(backend, q_hidden.device, q_hidden.dtype)
    if name == "reference":
        return qadapter_loss_reference(base_hidden, q_hidden, weight, labels, q_weight, q_bias, config)
    # Only scored positions are computed at all: pack them to [N, d].
    actions = labels[:, 1:]
    mask = actions != config.ignore_index
    q_taken, value = _backends.token_stats_fn(name)(
        base_hidden[:, :-1][mask],
        q_hidden[:, :-1][mask],
        weight,
        weight.detach() if q_weight is None else q_weight,
        q_bias,
        actions[mask].long(),
        alpha_tilde=config.alpha_tilde,
        alpha_0=config.alpha_0,
        chunk_size=chunk_size,
    )
    return _backends.pairwise_fn(name)(token_rewards(q_taken, value, mask, config), mask, config)


def qadapter_loss(
    base_hidden: torch.Tensor,
    q_hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    q_weight: torch.Tensor | None = None,
    q_bias: torch.Tensor | None = None,
    alpha_tilde: float = 1.0,
    alpha_0: float = 0.01,
    gamma: float = 1.0,
    beta: float = 0.1,
    value_at: str = "current",
    reward_norm: str = "padded",
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> QAdapterLossOutput:
    """Q-Adapter Bradley-Terry loss on preference pairs, without holding the full logits.

    Args:
        base_hidden: ``[B, T, d]`` final hidden states of the frozen model (no gradient).
        q_hidden: ``[B, T, d]`` final hidden states of the adapter-enabled model.
        weight: ``[V, d]`` frozen lm_head; base logits are ``base_hidden @ weight.T``.
        labels: ``[B, T]`` token ids aligned with input_ids (the op shifts); ``ignore_index``
            marks positions that are not scored. Rows ``0..B/2-1`` are chosen, row ``k + B/2``
            is the rejected response of pair ``k``.
        q_weight, q_bias: optional Q head (``[V, d]``, ``[V]``); defaults to the frozen ``weight``.
        alpha_tilde, alpha_0, gamma, beta, value_at, reward_norm: see DESIGN section 2.
        backend: ``"auto"``, ``"reference"``, ``"chunked"``, ``"triton"`` or ``"cuda"`` (see :func:`backends`).
        chunk_size: tokens per chunk for chunked backends; ``None`` picks it from a memory budget.
    """
    config = LossConfig(alpha_tilde, alpha_0, gamma, beta, value_at, reward_norm, ignore_index)
    return _loss(base_hidden, q_hidden, weight, labels, q_weight, q_bias, config, backend, chunk_size)


class QAdapterLoss(nn.Module):
    """:func:`qadapter_loss` as a module holding its hyper-parameters."""

    def __init__(
        self,
        *,
        alpha_tilde: float = 1.0,
        alpha_0: float = 0.01,
        gamma: float = 1.0,
        beta: float = 0.1,
        value_at: str = "current",
        reward_norm: str = "padded",
        ignore_index: int = -100,
        backend: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.config = LossConfig(alpha_tilde, alpha_0, gamma, beta, value_at, reward_norm, ignore_index)
        _backends.check_name(backend)
        _check_chunk_size(chunk_size)
        self.backend = backend
        self.chunk_size = chunk_size

    def forward(
        self,
        base_hidden: torch.Tensor,
        q_hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        q_weight: torch.Tensor | None = None,
        q_bias: torch.Tensor | None = None,
    ) -> QAdapterLossOutput:
        return _loss(
            base_hidden, q_hidden, weight, labels, q_weight, q_bias, self.config, self.backend, self.chunk_size
        )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"alpha_tilde={c.alpha_tilde}, alpha_0={c.alpha_0}, gamma={c.gamma}, beta={c.beta}, "
            f"value_at={c.value_at!r}, reward_norm={c.reward_norm!r}, backend={self.backend!r}"
        )
