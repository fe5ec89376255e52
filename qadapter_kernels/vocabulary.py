"""Gradient-free passes over the vocabulary: every measure a customized policy is judged by, from
hidden states, a chunk of tokens at a time, so no ``[tokens, V]`` tensor outlives its chunk.

Evaluation, likelihood benchmarks and comparisons ask for several things of the same tokens: the
loss's token statistics (for the learned adapter and for the step-0 one), the log-probs of given
targets under the customized policy and the frozen model, the KL between them, the greedy tokens.
One pair of GEMMs per chunk serves them all, and the logits are formed here and nowhere else
above the kernels: with the model's soft cap (:class:`LossConfig`'s ``logit_softcap``) applied
exactly as the training loss applies it, so a measure of a soft-capped model (Gemma-2) is the
training loss's number. The statistics with gradients are the backends'
(:func:`qadapter_kernels.qadapter_token_stats`); these are the same quantities, in float32
(float64 for float64 inputs), for measuring.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .autocast import outside_autocast
from .config import LossConfig, check_choice, check_integer
from .inputs import check_chunk_size, check_hidden_pair, check_targets, check_unbatched, stats_dtype
from .steps import softcap_
from .tiles import chunks, matmul_to

MEASURES = ("stats", "step0", "logprobs", "kl", "greedy", "top")
# [chunk, V] float32 buffers a chunk of the pass holds at once (the two logits, log pi1, the
# combined scores and their softmax, one temporary): what sizes the chunks.
_BUFFERS_PER_ROW = 6
DEFAULT_BUDGET = {"cpu": 128 * 2**20, "cuda": 1 * 2**30}


class TokenMeasures(NamedTuple):
    """Per token, what :func:`vocabulary_pass` was asked for (None where it was not)."""

    q_taken: torch.Tensor | None = None  # "stats": Q[t, a_t] of the adapter
    value: torch.Tensor | None = None  # "stats": the soft value V_t
    step0_q_taken: torch.Tensor | None = None  # "step0": the same for the step-0 adapter (Q = the base's logits)
    step0_value: torch.Tensor | None = None
    combined: torch.Tensor | None = None  # "logprobs": log pi~(a_t)
    base: torch.Tensor | None = None  # "logprobs": log pi1(a_t)
    kl: torch.Tensor | None = None  # "kl": KL(pi~ || pi1) of the token's whole distribution
    greedy: torch.Tensor | None = None  # "greedy": argmax pi~ (int64)
    top_logprobs: torch.Tensor | None = None  # "top": [..., k] the k largest log pi~, largest first
    top_ids: torch.Tensor | None = None  # "top": [..., k] their token ids (int64)


def capped_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  softcap: float | None = None) -> torch.Tensor:
    """``softcap * tanh((hidden @ weight^T + bias) / softcap)`` (uncapped for None) in float32
    (float64 for float64): one chunk's logits, the GEMM in the inputs' dtype."""
    logits = matmul_to(stats_dtype(hidden.dtype), hidden, weight.T)
    if bias is not None:
        logits += bias
    if softcap is not None:
        if logits.requires_grad:  # autograd keeps tanh's output for its backward: capped out of place
            return softcap * torch.tanh(logits / softcap)
        softcap_(logits, softcap)
    return logits


def pass_chunk_size(n_tokens: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per chunk: as many as keep the pass's ``[chunk, V]`` buffers within the device's budget."""
    per_row = _BUFFERS_PER_ROW * vocab * torch.finfo(stats_dtype(dtype)).bits // 8
    budget = DEFAULT_BUDGET.get(device.type, DEFAULT_BUDGET["cpu"])
    return max(1, min(max(n_tokens, 1), budget // per_row))


def _taken(rows: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """``rows[i, targets[i]]``, 0 where ``scored`` is false (an ignored target)."""
    taken = rows.gather(1, targets.clamp(0, rows.shape[1] - 1).unsqueeze(1)).squeeze(1)
    return torch.where(scored, taken, torch.zeros_like(taken))


@torch.no_grad()
@outside_autocast
def vocabulary_pass(
    base_hidden: torch.Tensor,
    q_hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    q_weight: torch.Tensor | None = None,
    q_bias: torch.Tensor | None = None,
    config: LossConfig | None = None,
    measures: tuple[str, ...] = ("stats",),
    chunk_size: int | None = None,
    top_k: int | None = None,
    **options,
) -> TokenMeasures:
    """The ``measures`` (of :data:`MEASURES`) of the customized policy for tokens whose hidden states
    are ``[..., d]``; each result is ``[...]``.

    ``targets`` ``[...]`` (token ids, no shift: position ``i`` scores ``targets[i]``) are needed for
    "stats", "step0" and "logprobs"; where a target is ``ignore_index`` those give 0. ``config`` and
    ``**options`` are the loss options (:class:`LossConfig`), the soft cap included; ``q_weight``,
    ``q_bias``: the Q head (default: the frozen ``weight``). A plain model's distribution is the
    combination with ``alpha_0=0, alpha_tilde=1``, so its KL to the base is this pass's too.
    "top" gives each token's ``top_k`` likeliest ids under the customized policy and their log-probs
    (what a server reports beside a token's own log-prob).
    """
    config = LossConfig.from_options(config, **options)
    if isinstance(measures, str) or not measures:
        raise ValueError(f"measures must be a non-empty tuple of {MEASURES}; got {measures!r}")
    measures = tuple(check_choice("measures", m, MEASURES) for m in measures)
    chunk_size = check_chunk_size(chunk_size)
    check_hidden_pair(base_hidden, q_hidden, weight, q_weight, q_bias)
    check_unbatched("vocabulary_pass", base_hidden, q_hidden, weight, q_weight, q_bias)
    if "top" in measures:
        top_k = check_integer("top_k", top_k, least=0, most=weight.shape[0], note=" (the vocabulary) for the measure 'top'")
    lead, hidden = q_hidden.shape[:-1], q_hidden.shape[-1]
    targeted = {"stats", "step0", "logprobs"} & set(measures)
    if targeted:
        if targets is None:
            raise ValueError(f"targets are needed for the measures {sorted(targeted)}")
        check_targets("targets", targets, lead, vocab=weight.shape[0], ignore_index=config.ignore_index,
                      device=q_hidden.device)
        targets = targets.reshape(-1).long()
    base, hq = base_hidden.reshape(-1, hidden), q_hidden.reshape(-1, hidden)
    wq = weight if q_weight is None else q_weight
    n, vocab = hq.shape[0], weight.shape[0]
    sd = stats_dtype(hq.dtype)
    out = {name: torch.empty(n, *((top_k,) if name.startswith("top") else ()),
                             dtype=torch.int64 if name in ("greedy", "top_ids") else sd, device=hq.device)
           for name in _fields(measures)}
    at, a0, cap = config.alpha_tilde, config.alpha_0, config.logit_softcap
    for s, e in chunks(n, chunk_size or pass_chunk_size(n, vocab, hq.dtype, hq.device)):
        z = capped_logits(base[s:e], weight, None, cap)
        q = capped_logits(hq[s:e], wq, q_bias, cap)
        log_pi1 = torch.log_softmax(z, dim=1)
        scores = (q + a0 * log_pi1) / at  # log pi~ up to its normaliser
        lse = scores.logsumexp(dim=1)
        if targeted:
            a = targets[s:e]
            scored = a != config.ignore_index
        if "stats" in measures:
            out["q_taken"][s:e] = _taken(q, a, scored)
            out["value"][s:e] = at * lse
        if "step0" in measures:  # Q = the base's own capped logits
            out["step0_q_taken"][s:e] = _taken(z, a, scored)
            out["step0_value"][s:e] = at * ((z + a0 * log_pi1) / at).logsumexp(dim=1)
        if "greedy" in measures:
            out["greedy"][s:e] = scores.argmax(dim=1)
        if "logprobs" in measures:
            out["combined"][s:e] = _taken(scores, a, scored) - torch.where(scored, lse, 0)
            out["base"][s:e] = _taken(log_pi1, a, scored)
        if "top" in measures:
            values, ids = scores.topk(top_k, dim=1)
            out["top_logprobs"][s:e], out["top_ids"][s:e] = values - lse.unsqueeze(1), ids
        if "kl" in measures:
            log_pi = scores.sub_(lse.unsqueeze(1))
            out["kl"][s:e] = (log_pi.exp() * (log_pi - log_pi1)).sum(dim=1)
    return TokenMeasures(**{name: value.reshape(*lead, *value.shape[1:]) for name, value in out.items()})


def _fields(measures: tuple[str, ...]) -> list[str]:
    fields = {"stats": ("q_taken", "value"), "step0": ("step0_q_taken", "step0_value"),
              "logprobs": ("combined", "base"), "kl": ("kl",), "greedy": ("greedy",),
              "top": ("top_logprobs", "top_ids")}
    return [name for m in measures for name in fields[m]]


@torch.no_grad()
@outside_autocast
def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_softcap: float | None = None,
    ignore_index: int = LossConfig.ignore_index,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``log_softmax(logits)[target]`` ``[...]`` of one model (no combination) from its hidden states
    ``[..., d]`` and head, its logits soft-capped like the model's; 0 where a target is ``ignore_index``.
    What a plain model's likelihood (the frozen base, a LoRA-tuned policy) needs, one chunk at a time."""
    config = LossConfig(logit_softcap=logit_softcap, ignore_index=ignore_index)
    chunk_size = check_chunk_size(chunk_size)
    check_hidden_pair(hidden, hidden, weight, None, bias)
    check_unbatched("token_logprobs", hidden, weight, bias)
    lead = hidden.shape[:-1]
    check_targets("targets", targets, lead, vocab=weight.shape[0], ignore_index=config.ignore_index,
                  device=hidden.device)
    flat, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long()
    scored = targets != config.ignore_index
    lse, taken = logit_stats(flat, weight, targets, scored, bias=bias, logit_softcap=config.logit_softcap,
                             chunk_size=chunk_size)
    return (taken - torch.where(scored, lse, 0)).reshape(lead)


@torch.no_grad()
@outside_autocast
def logit_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None = None,
                taken_where: torch.Tensor | None = None, *, bias: torch.Tensor | None = None,
                logit_softcap: float | None = None,
                chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logsumexp(logits), logits[target])``, each ``[N]``, of packed hidden states ``[N, d]`` over
    ``weight``'s rows, soft-capped like the model's, a chunk of tokens at a time. The taken logit is
    0 where ``taken_where`` is false (targets there may be anything) and None without ``targets``.
    One plain model's log-probs (:func:`token_logprobs`), and a rank's share of them where the head's
    rows are split over ranks (``vocab_parallel.py``)."""
    sd = stats_dtype(hidden.dtype)
    lse = torch.empty(hidden.shape[0], dtype=sd, device=hidden.device)
    taken = None if targets is None else torch.empty_like(lse)
    chunk = chunk_size or pass_chunk_size(hidden.shape[0], weight.shape[0], hidden.dtype, hidden.device)
    for s, e in chunks(hidden.shape[0], chunk):
        logits = capped_logits(hidden[s:e], weight, bias, logit_softcap)
        lse[s:e] = logits.logsumexp(dim=1)
        if taken is not None:
            taken[s:e] = _taken(logits, targets[s:e], taken_where[s:e])
    return lse, taken
