"""Inference side: the customized policy ``log pi~ = log_softmax((Q + alpha_0 * log pi1) / alpha~)``."""

from __future__ import annotations

import torch

from .chunked import auto_chunk_size
from .config import LossConfig, check_real
from .inputs import check_chunk_size, check_float_tensor, check_head, stats_dtype


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
    return alpha_tilde, alpha_0


def combine_logits(
    base_logits: torch.Tensor,
    q_values: torch.Tensor,
    *,
    alpha_tilde: float = LossConfig.alpha_tilde,
    alpha_0: float = LossConfig.alpha_0,
) -> torch.Tensor:
    """Combined-policy log-probs ``[..., V]`` (float32, float64 for float64) from logits already held."""
    alpha_tilde, alpha_0 = check_combine_inputs(base_logits, q_values, alpha_tilde, alpha_0)
    sd = stats_dtype(q_values.dtype)
    log_pi1 = torch.log_softmax(base_logits.to(sd), dim=-1)
    return torch.log_softmax((q_values.to(sd) + alpha_0 * log_pi1) / alpha_tilde, dim=-1)


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
) -> torch.Tensor:
    """Combined-policy log-probs ``[..., V]`` from hidden states ``[..., d]``, a chunk of tokens at a time.

    Only the output is ``[tokens, V]``; the base logits and Q-values exist one chunk at a time.
    """
    check_chunk_size(chunk_size)
    check_float_tensor("base_hidden", base_hidden)
    check_float_tensor("q_hidden", q_hidden)
    if base_hidden.shape != q_hidden.shape or q_hidden.dim() < 1:
        raise ValueError(
            f"base_hidden must have q_hidden's shape {tuple(q_hidden.shape)} ([..., d]); got {tuple(base_hidden.shape)}"
        )
    if base_hidden.dtype != q_hidden.dtype or base_hidden.device != q_hidden.device:
        raise TypeError(
            f"base_hidden must match q_hidden's dtype {q_hidden.dtype} and device {q_hidden.device}; "
            f"got {base_hidden.dtype} on {base_hidden.device}"
        )
    check_head(weight, q_weight, q_bias, hidden_size=q_hidden.shape[-1], dtype=q_hidden.dtype, device=q_hidden.device)
    wq = weight if q_weight is None else q_weight
    lead = q_hidden.shape[:-1]
    base, hq = base_hidden.reshape(-1, base_hidden.shape[-1]), q_hidden.reshape(-1, q_hidden.shape[-1])
    n, vocab = hq.shape[0], weight.shape[0]
    out = torch.empty(n, vocab, dtype=stats_dtype(hq.dtype), device=hq.device)
    chunk = chunk_size or auto_chunk_size(max(n, 1), vocab, hq.dtype, hq.device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        q = hq[s:e] @ wq.T
        if q_bias is not None:
            q += q_bias
        out[s:e] = combine_logits(base[s:e] @ weight.T, q, alpha_tilde=alpha_tilde, alpha_0=alpha_0)
    return out.reshape(*lead, vocab)
