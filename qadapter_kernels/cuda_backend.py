"""The ``cuda`` backend: the chunked pipeline with the compiled CUDA row step, the pairwise
Bradley-Terry loss in one launch, and the decode combine (csrc/qadapter_kernels.h), through the
``torch.library`` ops of ``_cuda_ops.py`` over the extension ``_cuda.py`` loads.

- ``token_stats``: ``chunked.chunked_token_stats`` with the fused :func:`cuda_row_step`.
- :func:`pairwise_loss`: drop-in for ``pairwise.pairwise_loss``, forward and gradient in one launch.
- :func:`decode_combine`: combined-policy log-probs for a decode step, with temperature, top-k,
  top-p filtering and seeded sampling; :func:`combine_logits` is its log-probs, the backend's
  decode combine.
"""

from __future__ import annotations

import functools

import torch

from . import _cuda, _cuda_ops, pairwise
from .chunked import chunked_token_stats
from .config import REWARD_NORM, LossConfig, check_integer, check_real
from .first_order import fused_backward
from .pairwise import QAdapterLossOutput, ScoredTokens
from .registry import Backend
from .steps import kernel_block_stats, torch_row_step

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_PAIRWISE_MAX_BATCH = 2048  # QAK_PAIRWISE_MAX_BATCH in csrc/qadapter_kernels.h


_NORM_CODES = {name: code for code, name in enumerate(REWARD_NORM)}  # enum qak_reward_norm


def cuda_row_step(z, q, targets, alpha_tilde, alpha_0, p_dtype, softcap=None, block_stats=None):
    """The fused row step (``steps.RowStep`` contract); p overwrites q when p_dtype is q's dtype.
    A soft cap is applied by the kernel as it reads z and q. ``block_stats`` (gradient filtering, a
    contiguous float32 ``[C, ceil(V / FILTER_BLOCK)]``) are written by the kernel's pass that
    writes p: each block's sum of p, of the policy itself (never times a cap's slope).

    float64 inputs keep float64 statistics through the eager step: the kernels compute in float32.
    """
    if q.dtype not in KERNEL_DTYPES:
        return torch_row_step(z, q, targets, alpha_tilde, alpha_0, p_dtype, softcap, block_stats)
    z, q, targets = z.contiguous(), q.contiguous(), targets.contiguous()
    if block_stats is not None:
        block_stats = kernel_block_stats(block_stats, *q.shape)
    args = (float(alpha_tilde), float(alpha_0), float(softcap or 0.0), block_stats)
    if p_dtype == q.dtype:
        q_taken, value = _cuda_ops.row_step_(z, q, targets, *args)
        return q_taken, value, q
    q_taken, value, p = _cuda_ops.row_step(z, q, targets, *args)
    return q_taken, value, p.to(p_dtype)


cuda_token_stats = functools.partial(chunked_token_stats, row_step=cuda_row_step)


class _PairwiseBT(torch.autograd.Function):
    """stats = [loss, bt, chi2, accuracy, margin] from packed rewards; only stats[0] has a gradient."""

    @staticmethod
    def forward(ctx, packed, counts, padded_len, beta, norm_code):
        seq_rewards, stats, grad = _cuda_ops.pairwise_bt(packed, counts, padded_len, beta, norm_code)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(seq_rewards)
        return stats, seq_rewards

    @staticmethod
    @fused_backward
    def backward(ctx, grad_stats, _grad_seq):
        (grad,) = ctx.saved_tensors
        return grad_stats[0] * grad, None, None, None, None


def pairwise_loss(rewards: torch.Tensor, tokens: ScoredTokens, config: LossConfig) -> QAdapterLossOutput:
    """``pairwise.pairwise_loss`` with the pairing, BT, chi2 and dL/dr_t in one kernel launch.

    The kernel takes packed CUDA float32 rewards of at least one token and B <= 2048 rows;
    anything else (float64 rewards, CPU tensors) goes to the shared torch implementation.
    """
    kernel_ok = rewards.is_cuda and rewards.dtype == torch.float32 and tokens.batch <= _PAIRWISE_MAX_BATCH
    if not kernel_ok or rewards.numel() == 0:
        return pairwise.pairwise_loss(rewards, tokens, config)
    stats, seq_rewards = _PairwiseBT.apply(
        rewards, tokens.counts, tokens.padded_len, config.beta, _NORM_CODES[config.reward_norm]
    )
    half = tokens.batch // 2
    detached = stats.detach()
    return QAdapterLossOutput(
        loss=stats[0],
        bt_loss=detached[1],
        chi2_loss=detached[2],
        chosen_rewards=seq_rewards[:half],
        rejected_rewards=seq_rewards[half:],
        accuracy=detached[3],
        margin=detached[4],
    )


def decode_combine(
    base_logits: torch.Tensor,
    q_values: torch.Tensor,
    *,
    alpha_tilde: float = LossConfig.alpha_tilde,
    alpha_0: float = LossConfig.alpha_0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    sample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Combined-policy log-probs ``[..., V]`` (float32) and, if ``sample``, one token id per row.

    The log-probs are ``combine.combine_logits`` (unfiltered). Sampling draws from
    ``softmax(logprobs / temperature)`` restricted to the ``top_k`` most likely tokens (0: all),
    then to the smallest most-likely set of mass >= ``top_p``, as Hugging Face's warpers do;
    ``top_k=1`` is greedy. The same ``seed`` gives the same ids. Inputs: CUDA float32, float16
    or bfloat16 of one shape.
    """
    alpha_tilde = check_real("alpha_tilde", alpha_tilde, positive=True)
    alpha_0 = check_real("alpha_0", alpha_0, non_negative=True)
    temperature = check_real("temperature", temperature, positive=True)
    top_p = check_real("top_p", top_p, positive=True)
    if top_p > 1:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    top_k = check_integer("top_k", top_k, least=0, note=" (0: no top-k filter)")
    seed = check_integer("seed", seed, least=0, most=2**63 - 1)
    if base_logits.shape != q_values.shape or base_logits.dim() < 1:
        raise ValueError(
            f"q_values must have base_logits' shape {tuple(base_logits.shape)} ([..., V]); got {tuple(q_values.shape)}"
        )
    if base_logits.dtype not in KERNEL_DTYPES or q_values.dtype != base_logits.dtype:
        raise TypeError(
            f"base_logits and q_values must share one of float32, float16, bfloat16; got {base_logits.dtype} "
            f"and {q_values.dtype} (float64: use combine_logits)"
        )
    lead, vocab = base_logits.shape[:-1], base_logits.shape[-1]
    z = base_logits.reshape(-1, vocab).contiguous()
    q = q_values.reshape(-1, vocab).contiguous()
    _cuda.extension()  # the reason, when the extension cannot run here, before any dispatch
    logprobs, sampled = _cuda_ops.decode_combine(z, q, alpha_tilde, alpha_0, temperature, top_k, top_p, seed, sample)
    return logprobs.reshape(*lead, vocab), sampled.reshape(lead) if sample else None


def combine_logits(base_logits: torch.Tensor, q_values: torch.Tensor, *, alpha_tilde: float = LossConfig.alpha_tilde,
                   alpha_0: float = LossConfig.alpha_0) -> torch.Tensor:
    """The backend's decode combine (``combine.combine_logits``' contract): :func:`decode_combine`'s
    log-probs, one kernel per step (float64 stays eager); the sampling is the caller's."""
    if base_logits.dtype not in KERNEL_DTYPES:
        from .combine import combine_logits as eager

        return eager(base_logits, q_values, alpha_tilde=alpha_tilde, alpha_0=alpha_0)
    return decode_combine(base_logits, q_values, alpha_tilde=alpha_tilde, alpha_0=alpha_0, sample=False)[0]


BACKEND = Backend(
    name="cuda",
    summary="chunked pipeline with the compiled CUDA row step and pairwise BT kernel",
    token_stats=cuda_token_stats,
    availability=_cuda.backend_status,
    pairwise=pairwise_loss,
    combine=combine_logits,
)
