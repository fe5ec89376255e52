"""Triton decode combine: the customized policy's log-probs from logits already held.

At generation time the model produces, for the last position of each sequence, the frozen
model's logits ``z`` and the adapter's Q-values; sampling needs

    log pi~ = log_softmax((q + alpha_0 * log_softmax(z)) / alpha~) = c - lse(c),
    c = (q + alpha_0 * z) / alpha~

because the ``alpha_0 * lse(z) / alpha~`` shift is the same for every token and cancels. So one
statistics pass (online logsumexp of ``c``) and one write pass per row suffice, instead of the
two softmaxes and several ``[B, V]`` temporaries of the eager formula. Same result as
``qadapter_kernels.combine.combine_logits`` (float32 out, float32 math).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..combine import check_combine_inputs
from ..config import LossConfig
from ._common import check_kernel_inputs, launch_guard, row_major
from .row_step import MAX_BLOCK_V, NUM_WARPS, load_block, online_lse


@triton.jit
def _combine_kernel(
    z_ptr, q_ptr, out_ptr,
    V, stride_z, stride_q, stride_out,
    alpha_tilde, alpha_0,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    q_row = q_ptr + row * stride_q
    out_row = out_ptr + row * stride_out
    # Float32 scalars: torch.compile hands Python floats to Triton as float64.
    alpha_0 = tl.cast(alpha_0, tl.float32)
    inv_alpha_tilde = 1.0 / tl.cast(alpha_tilde, tl.float32)
    cols = tl.arange(0, BLOCK_V)

    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        _, c, _ = load_block(z_row, q_row, start + cols, V, alpha_0, inv_alpha_tilde, 0.0, False)
        m, s = online_lse(m, s, c)
    log_s = tl.log(s)

    for start in range(0, V, BLOCK_V):
        _, c, _ = load_block(z_row, q_row, start + cols, V, alpha_0, inv_alpha_tilde, 0.0, False)
        # c - m first: exact where c is near m, which c - (m + log s) would round at m's magnitude.
        tl.store(out_row + start + cols, (c - m) - log_s, mask=start + cols < V)


def combine_logits(
    base_logits: torch.Tensor,
    q_values: torch.Tensor,
    *,
    alpha_tilde: float = LossConfig.alpha_tilde,
    alpha_0: float = LossConfig.alpha_0,
) -> torch.Tensor:
    """Combined-policy log-probs ``[..., V]`` in float32 (typically ``[B, V]``, the last position)."""
    alpha_tilde, alpha_0 = check_combine_inputs(base_logits, q_values, alpha_tilde, alpha_0)
    if base_logits.dim() == 0:
        raise ValueError("base_logits must have a vocabulary dimension ([..., V]); got a scalar")
    check_kernel_inputs("decode combine", base_logits, q_values)
    vocab = base_logits.shape[-1]
    z = row_major(base_logits.reshape(-1, vocab))
    q = row_major(q_values.reshape(-1, vocab))
    out = torch.empty(z.shape, dtype=torch.float32, device=z.device)
    if out.numel():
        with launch_guard(z):
            _combine_kernel[(z.shape[0],)](
                z, q, out,
                vocab, z.stride(0), q.stride(0), out.stride(0),
                alpha_tilde, alpha_0,
                BLOCK_V=min(MAX_BLOCK_V, triton.next_power_of_2(vocab)),
                num_warps=NUM_WARPS,
            )
    return out.reshape(base_logits.shape)
