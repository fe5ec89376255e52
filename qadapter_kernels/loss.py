"""The public Q-Adapter loss and its token statistics: checks, packing of the scored tokens, dispatch to a backend."""

from __future__ import annotations

from functools import partial

import torch
from torch import distributed as dist
from torch import nn

from . import registry
from .autocast import outside_autocast
from .config import LossConfig
from .inputs import check_chunk_size, check_loss_inputs, check_totals
from .pairwise import QAdapterLossOutput, ScoredTokens, TokenStats, pairwise_loss, share_of_total, token_rewards
from .vocab_parallel import check_group, sharded_token_stats, split_head


def _scored_tokens(base_hidden, q_hidden, weight, labels, q_weight, q_bias, config, backend, chunk_size, layout, *,
                   paired):
    """The checks, the backend that runs here, and where the scored tokens sit: everything before the heavy work."""
    check_loss_inputs(base_hidden, q_hidden, weight, labels, q_weight, q_bias, config, paired=paired,
                      vocab=None if layout is None else layout.vocab)
    impl = registry.resolve(backend, q_hidden.device, q_hidden.dtype)
    return impl, ScoredTokens.from_labels(labels, config.ignore_index)


def _token_stats(impl, tokens, base_hidden, q_hidden, weight, labels, q_weight, q_bias, config, chunk_size, layout):
    # Only scored positions are computed at all: pack them to [N, d], and keep them packed.
    token_stats = impl.token_stats if layout is None else partial(sharded_token_stats, impl, layout=layout)
    q_taken, value = token_stats(
        base_hidden[:, :-1][tokens.mask],
        q_hidden[:, :-1][tokens.mask],
        weight,
        weight.detach() if q_weight is None else q_weight,
        q_bias,
        labels[:, 1:][tokens.mask].long(),
        registry.StatsOptions(config.alpha_tilde, config.alpha_0, config.logit_softcap, chunk_size,
                              config.grad_filter_eps),
    )
    return TokenStats(q_taken, value, token_rewards(q_taken, value, tokens, config), tokens, config)


def _loss(base_hidden, q_hidden, weight, labels, q_weight, q_bias, config: LossConfig, backend, chunk_size,
          total_pairs=None, total_tokens=None, group=None, vocab_start=None):
    chunk_size = check_chunk_size(chunk_size)
    weight, q_weight, q_bias, layout = split_head(weight, q_weight, q_bias, group, vocab_start)
    inputs = (base_hidden, q_hidden, weight, labels, q_weight, q_bias, config)
    impl, tokens = _scored_tokens(*inputs, backend, chunk_size, layout, paired=True)
    totals = None
    if total_pairs is not None or total_tokens is not None:
        totals = check_totals(total_pairs, total_tokens, config, tokens.batch // 2, int(tokens.counts.sum()))
    rewards = _token_stats(impl, tokens, *inputs, chunk_size, layout).rewards
    if totals is None:
        return (impl.pairwise or pairwise_loss)(rewards, tokens, config)
    return share_of_total(impl.pairwise or pairwise_loss, rewards, tokens, config, *totals)


@outside_autocast
def qadapter_token_stats(
    base_hidden: torch.Tensor,
    q_hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    q_weight: torch.Tensor | None = None,
    q_bias: torch.Tensor | None = None,
    config: LossConfig | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    **options,
) -> TokenStats:
    """The per-token statistics :func:`qadapter_loss` is built on, for building other losses on them.

    Returns :class:`TokenStats`: for every scored token, packed in row order, ``Q[t, a_t]``, the soft
    value ``V_t`` and the reward ``r_t`` (``value_at``, ``gamma``), differentiable in ``q_hidden``,
    ``q_weight`` and ``q_bias``, computed by the backend without the ``[B, T, V]`` logits; with
    ``rows`` and ``positions``. The arguments are :func:`qadapter_loss`'s, except that any number of
    rows is accepted (no pairing), and the statistics are the same on every rank of a ``group``. The
    Q-Adapter loss itself is ``bt_terms(sequence_rewards(stats)).mean() + beta * stats.rewards.square().mean()``.
    """
    config = LossConfig.from_options(config, **options)
    chunk_size = check_chunk_size(chunk_size)
    weight, q_weight, q_bias, layout = split_head(weight, q_weight, q_bias, group, vocab_start)
    inputs = (base_hidden, q_hidden, weight, labels, q_weight, q_bias, config)
    impl, tokens = _scored_tokens(*inputs, backend, chunk_size, layout, paired=False)
    return _token_stats(impl, tokens, *inputs, chunk_size, layout)


@outside_autocast
def qadapter_loss(
    base_hidden: torch.Tensor,
    q_hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    q_weight: torch.Tensor | None = None,
    q_bias: torch.Tensor | None = None,
    config: LossConfig | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    total_pairs: int | None = None,
    total_tokens: int | None = None,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    **options,
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
        config: the loss options (:class:`LossConfig`); ``**options`` overrides single fields
            (``alpha_tilde``, ``alpha_0``, ``gamma``, ``beta``, ``value_at``, ``reward_norm``,
            ``ignore_index``: docs/design.md, "The method"; ``logit_softcap``: the model's final
            logit soft-capping, applied to both heads' logits).
        backend: ``"auto"`` or a name of :func:`backends` (which also says why one cannot run).
        chunk_size: tokens per chunk for chunked backends; ``None`` picks it from a memory budget.
        total_pairs, total_tokens: the pair and scored-token counts of a larger batch this one is
            part of (gradient accumulation, data-parallel ranks): the loss is then this batch's share,
            and the shares of the parts add up to the whole batch's loss. ``reward_norm`` "mean" or
            "sum" only. ``None``: this batch alone.
        group, vocab_start: a vocabulary-parallel head. ``weight`` (and ``q_weight``, ``q_bias``) are
            this rank's rows of the head split over the process group ``group``, the first of them
            vocabulary id ``vocab_start`` (``vocab_shard(V, group)`` gives ``torch.tensor_split``'s
            rows); ``labels`` are ids of the whole vocabulary, the hidden states the same on every
            rank. Every rank gets the loss one process holding the whole head computes, and the
            gradients of its own rows. ``None``: the head is whole. A head of DTensors sharded on
            their rows (``Shard(0)``, a tensor-parallel lm_head) brings its own group and offset.
    """
    config = LossConfig.from_options(config, **options)
    return _loss(base_hidden, q_hidden, weight, labels, q_weight, q_bias, config, backend, chunk_size,
                 total_pairs, total_tokens, group, vocab_start)


class QAdapterLoss(nn.Module):
    """:func:`qadapter_loss` as a module holding its options (a :class:`LossConfig`)."""

    def __init__(
        self, config: LossConfig | None = None, *, backend: str = "auto", chunk_size: int | None = None,
        group: dist.ProcessGroup | None = None, vocab_start: int | None = None, **options
    ) -> None:
        super().__init__()
        self.config = LossConfig.from_options(config, **options)
        registry.check_options(backend, self.config.grad_filter_eps)
        check_group(group)
        self.backend = backend
        self.chunk_size = check_chunk_size(chunk_size)
        self.group, self.vocab_start = group, vocab_start  # a vocabulary-parallel head (qadapter_loss)

    @outside_autocast
    def forward(
        self,
        base_hidden: torch.Tensor,
        q_hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        q_weight: torch.Tensor | None = None,
        q_bias: torch.Tensor | None = None,
        *,
        total_pairs: int | None = None,
        total_tokens: int | None = None,
    ) -> QAdapterLossOutput:
        return _loss(
            base_hidden, q_hidden, weight, labels, q_weight, q_bias, self.config, self.backend, self.chunk_size,
            total_pairs, total_tokens, self.group, self.vocab_start,
        )

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.config.as_dict().items())
        return f"{options}, backend={self.backend!r}"
