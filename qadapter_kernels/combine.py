"""The customized policy ``log pi~ = log_softmax((Q + alpha_0 * log pi1) / alpha~)``: whole rows for
decoding, and the log-probs of given targets (with gradients) for likelihoods and other losses."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import distributed as dist

from . import registry
from .autocast import outside_autocast
from .config import LossConfig, check_real
from .inputs import (
    any_set,
    check_chunk_size,
    check_float_tensor,
    check_hidden_pair,
    check_targets,
    check_unbatched,
    stats_dtype,
)
from .tiles import chunks
from .vocab_parallel import (
    agreed_chunk,
    check_group,
    check_outside_transforms,
    local_head,
    log_softmax,
    sharded_token_logprobs,
    sharded_token_stats,
    split_head,
    sum_grad_across_ranks,
)
from .vocabulary import capped_logits, pass_chunk_size, token_logprobs


def check_combine_inputs(base_logits, q_values, alpha_tilde, alpha_0) -> tuple[float, float]:
    """The checks every combine implementation shares; returns the validated ``(alpha_tilde, alpha_0)``."""
    alpha_tilde = check_real("alpha_tilde", alpha_tilde, positive=True)
    alpha_0 = check_real("alpha_0", alpha_0, non_negative=True)
    check_float_tensor("base_logits", base_logits)
    check_float_tensor("q_values", q_values)
    if base_logits.shape != q_values.shape:
        raise ValueError(
            f"q_values must have base_logits' shape {tuple(base_logits.shape)}; got {tuple(q_values.shape)}"
        )
    if base_logits.device != q_values.device:
        raise ValueError(f"q_values must be on base_logits' device {base_logits.device}; got {q_values.device}")
    if base_logits.dtype != q_values.dtype:
        raise TypeError(f"q_values must have base_logits' dtype {base_logits.dtype}; got {q_values.dtype} (cast one: "
                        "mixed dtypes would silently compute in the narrower one)")
    return alpha_tilde, alpha_0


@outside_autocast
def combine_logits(
    base_logits: torch.Tensor,
    q_values: torch.Tensor,
    *,
    alpha_tilde: float = LossConfig.alpha_tilde,
    alpha_0: float = LossConfig.alpha_0,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Combined-policy log-probs ``[..., V]`` (float32, float64 for float64) from logits already held.

    ``group``: the logits are this rank's columns ``[..., V_r]`` of a vocabulary split over the process
    group (a vocabulary-parallel head); the result is the same columns of the whole row's log-probs.
    """
    alpha_tilde, alpha_0 = check_combine_inputs(base_logits, q_values, alpha_tilde, alpha_0)
    check_group(group)
    sd = stats_dtype(q_values.dtype)
    log_pi1 = log_softmax(base_logits.to(sd), group)
    return log_softmax((q_values.to(sd) + alpha_0 * log_pi1) / alpha_tilde, group)


@outside_autocast
def combined_logprobs(
    base_hidden: torch.Tensor,
    q_hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    q_weight: torch.Tensor | None = None,
    q_bias: torch.Tensor | None = None,
    alpha_tilde: float = LossConfig.alpha_tilde,
    alpha_0: float = LossConfig.alpha_0,
    chunk_size: int | None = None,
    logit_softcap: float | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Combined-policy log-probs ``[..., V]`` from hidden states ``[..., d]``, a chunk of tokens at a time.

    Only the output is ``[tokens, V]``; the base logits and Q-values exist one chunk at a time.
    ``logit_softcap``: the model's final logit soft-capping, applied to both heads' logits.
    ``group``: ``weight`` (and ``q_weight``, ``q_bias``) are this rank's rows of a head split over the
    process group (or DTensors sharded on their rows, which bring their group), the hidden states the
    same on every rank; the result ``[..., V_r]`` is the whole row's log-probs at this rank's
    vocabulary ids.
    """
    chunk_size = check_chunk_size(chunk_size)
    config = LossConfig(alpha_tilde=alpha_tilde, alpha_0=alpha_0, logit_softcap=logit_softcap)
    weight, q_weight, q_bias, group, _ = local_head(weight, q_weight, q_bias, group, None)
    check_hidden_pair(base_hidden, q_hidden, weight, q_weight, q_bias)
    check_unbatched("combined_logprobs", base_hidden, q_hidden, weight, q_weight, q_bias)
    check_group(group)
    check_outside_transforms(group)
    # The frozen model gets no gradient, as in the loss: pi1's hidden states and head are constants
    # (a shared head takes its gradient through neither side).
    weight = weight.detach()
    wq = weight if q_weight is None else q_weight
    lead = q_hidden.shape[:-1]
    base, hq = base_hidden.detach().reshape(-1, base_hidden.shape[-1]), q_hidden.reshape(-1, q_hidden.shape[-1])
    n, vocab = hq.shape[0], weight.shape[0]
    chunk = chunk_size or pass_chunk_size(n, vocab, hq.dtype, hq.device)
    if group is not None:  # each rank's gradient to the q hidden states is its rows' share
        chunk = agreed_chunk(chunk, group, hq.device)
        hq = sum_grad_across_ranks(hq, group)
    out = torch.empty(n, vocab, dtype=stats_dtype(hq.dtype), device=hq.device)
    for s, e in chunks(n, chunk):
        out[s:e] = combine_logits(capped_logits(base[s:e], weight, None, config.logit_softcap),
                                  capped_logits(hq[s:e], wq, q_bias, config.logit_softcap),
                                  alpha_tilde=config.alpha_tilde, alpha_0=config.alpha_0, group=group)
    return out.reshape(*lead, vocab)


class TargetLogprobs(NamedTuple):
    """Log-probs of given targets (:func:`combined_logprobs_at`); 0 where the target is ignored."""

    combined: torch.Tensor  # log pi~(a): differentiable in q_hidden, q_weight, q_bias
    base: torch.Tensor  # log pi1(a): the frozen model's, no gradient


@outside_autocast
def combined_logprobs_at(
    base_hidden: torch.Tensor,
    q_hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    q_weight: torch.Tensor | None = None,
    q_bias: torch.Tensor | None = None,
    alpha_tilde: float = LossConfig.alpha_tilde,
    alpha_0: float = LossConfig.alpha_0,
    ignore_index: int = LossConfig.ignore_index,
    backend: str = "auto",
    chunk_size: int | None = None,
    logit_softcap: float | None = None,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
) -> TargetLogprobs:
    """Log-probs of ``targets`` ``[...]`` under the customized policy and the frozen model, from hidden
    states ``[..., d]``, with nothing ``[tokens, V]`` held: what a sequence likelihood or another
    preference loss (DPO on ``pi~`` against ``pi1``) needs.

    Position ``i`` scores ``targets[i]`` (no shift: for Hugging Face labels pass ``hidden[:, :-1]`` and
    ``labels[:, 1:]``); positions whose target is ``ignore_index`` give 0 and cost nothing. The
    combined log-prob is ``(Q[a] + alpha_0 * log pi1(a) - V) / alpha~`` from the backend's token
    statistics (its gradient is theirs), plus one gradient-free chunked pass for ``log pi1(a)``.
    ``logit_softcap``: the model's final logit soft-capping, applied to both heads' logits.
    ``group``, ``vocab_start``: a vocabulary-parallel head, as :func:`qadapter_kernels.qadapter_loss`
    takes it; every rank gets the whole log-probs.
    """
    config = LossConfig(alpha_tilde=alpha_tilde, alpha_0=alpha_0, ignore_index=ignore_index,
                        logit_softcap=logit_softcap)
    alpha_tilde, alpha_0, logit_softcap = config.alpha_tilde, config.alpha_0, config.logit_softcap
    chunk_size = check_chunk_size(chunk_size)
    weight, q_weight, q_bias, layout = split_head(weight, q_weight, q_bias, group, vocab_start)
    check_hidden_pair(base_hidden, q_hidden, weight, q_weight, q_bias)
    check_targets("targets", targets, q_hidden.shape[:-1], vocab=weight.shape[0] if layout is None else layout.vocab,
                  ignore_index=config.ignore_index, device=q_hidden.device)
    impl = registry.resolve(backend, q_hidden.device, q_hidden.dtype)
    mask = targets != config.ignore_index
    zeros = torch.zeros(targets.shape, dtype=stats_dtype(q_hidden.dtype), device=q_hidden.device)
    if not any_set(mask):  # still on the trainable inputs' graph: a backward gives them zero gradients
        trainable = [t for t in (q_hidden, q_weight, q_bias) if t is not None and t.requires_grad]
        attached = zeros + sum(t.flatten()[:0].sum() for t in trainable) if trainable else zeros
        return TargetLogprobs(attached, zeros.clone())
    base, hq, actions = base_hidden[mask], q_hidden[mask], targets[mask].long()
    stats_args = (base, hq, weight, weight.detach() if q_weight is None else q_weight, q_bias, actions,
                  registry.StatsOptions(alpha_tilde, alpha_0, logit_softcap, chunk_size))
    if layout is None:
        q_taken, value = impl.token_stats(*stats_args)
        log_pi1 = token_logprobs(base, weight, actions, logit_softcap=logit_softcap, chunk_size=chunk_size)
    else:
        q_taken, value = sharded_token_stats(impl, *stats_args, layout=layout)
        log_pi1 = sharded_token_logprobs(base, weight, actions, layout, logit_softcap, chunk_size)
    combined = (q_taken + alpha_0 * log_pi1 - value) / alpha_tilde
    return TargetLogprobs(zeros.masked_scatter(mask, combined), zeros.masked_scatter(mask, log_pi1))
