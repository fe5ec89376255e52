"""The CUDA extension's kernels as ``torch.library`` custom ops, so ``torch.compile`` traces them.

Each op allocates its outputs and launches one kernel of ``qadapter_kernels._C``; its fake
(meta) implementation gives the output shapes and dtypes without a GPU, which is what the
compiler needs to trace a training step through them instead of breaking the graph.
"""

from __future__ import annotations

import torch

from . import _cuda


@torch.library.custom_op("qadapter::row_step_", mutates_args=("q", "block_stats"), device_types="cuda")
def row_step_(z: torch.Tensor, q: torch.Tensor, targets: torch.Tensor, alpha_tilde: float,
              alpha_0: float, softcap: float,
              block_stats: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_taken, value)`` of each row; the policy ``p`` overwrites ``q`` (in ``q``'s dtype).

    ``softcap`` > 0: z and q are raw logits, capped as the kernel reads them (``steps.RowStep``); 0: none.
    ``block_stats`` (gradient filtering): a float32 ``[C, ceil(V / steps.FILTER_BLOCK)]`` the kernel
    fills with each block's sum of p (of the policy itself, never times a cap's slope)."""
    q_taken = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    value = torch.empty_like(q_taken)
    _cuda.extension().row_step(z, q, targets, alpha_tilde, alpha_0, softcap, q_taken, value, q, block_stats)
    return q_taken, value


@row_step_.register_fake
def _(z, q, targets, alpha_tilde, alpha_0, softcap, block_stats=None):
    return q.new_empty(q.shape[0], dtype=torch.float32), q.new_empty(q.shape[0], dtype=torch.float32)


@torch.library.custom_op("qadapter::row_step", mutates_args=("block_stats",), device_types="cuda")
def row_step(z: torch.Tensor, q: torch.Tensor, targets: torch.Tensor, alpha_tilde: float,
             alpha_0: float, softcap: float,
             block_stats: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q_taken, value, p)`` with ``p`` a new float32 ``[C, V]`` tensor; ``q`` is left as it is.
    ``softcap`` and ``block_stats`` as :func:`row_step_`'s."""
    q_taken = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    value = torch.empty_like(q_taken)
    p = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    _cuda.extension().row_step(z, q, targets, alpha_tilde, alpha_0, softcap, q_taken, value, p, block_stats)
    return q_taken, value, p


@row_step.register_fake
def _(z, q, targets, alpha_tilde, alpha_0, softcap, block_stats=None):
    rows = q.new_empty(q.shape[0], dtype=torch.float32)
    return rows, torch.empty_like(rows), q.new_empty(q.shape, dtype=torch.float32)


@torch.library.custom_op("qadapter::pairwise_bt", mutates_args=(), device_types="cuda")
def pairwise_bt(rewards: torch.Tensor, counts: torch.Tensor, padded_len: int, beta: float,
                norm_code: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(seq_rewards [B], stats [5], grad [N])`` from packed rewards (stats: loss, bt, chi2, accuracy, margin)."""
    seq_rewards = torch.empty(counts.shape[0], dtype=torch.float32, device=rewards.device)
    stats = torch.empty(5, dtype=torch.float32, device=rewards.device)
    grad = torch.empty_like(rewards)
    _cuda.extension().pairwise_bt(rewards, counts, padded_len, beta, norm_code, seq_rewards, stats, grad)
    return seq_rewards, stats, grad


@pairwise_bt.register_fake
def _(rewards, counts, padded_len, beta, norm_code):
    return (rewards.new_empty(counts.shape[0], dtype=torch.float32), rewards.new_empty(5, dtype=torch.float32),
            torch.empty_like(rewards))


@torch.library.custom_op("qadapter::decode_combine", mutates_args=(), device_types="cuda")
def decode_combine(z: torch.Tensor, q: torch.Tensor, alpha_tilde: float, alpha_0: float, temperature: float,
                   top_k: int, top_p: float, seed: int, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs [R, V] float32, sampled [R] int64, empty without sampling)`` of ``[R, V]`` logits."""
    logprobs = torch.empty(z.shape, dtype=torch.float32, device=z.device)
    sampled = torch.empty(z.shape[0] if sample else 0, dtype=torch.int64, device=z.device)
    _cuda.extension().decode_combine(z, q, alpha_tilde, alpha_0, temperature, top_k, top_p, seed, logprobs,
                                     sampled if sample else None)
    return logprobs, sampled


@decode_combine.register_fake
def _(z, q, alpha_tilde, alpha_0, temperature, top_k, top_p, seed, sample):
    return z.new_empty(z.shape, dtype=torch.float32), z.new_empty(z.shape[0] if sample else 0, dtype=torch.int64)
