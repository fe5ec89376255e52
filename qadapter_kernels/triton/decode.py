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

from .._contract import _check_float_tensor, _check_real
from ._common import INTERPRET, check_kernel_inputs, row_major

_MAX_BLOCK_V = 64 if INTERPRET else 4096
_NUM_WARPS = 8


@triton.jit
def _combined(z_row, q_row, cols, V, alpha_0, inv_alpha_tilde):
    in_row = cols < V
    z = tl.load(z_row + cols, mask=in_row, other=0.0).to(tl.float32)
    q = tl.load(q_row + cols, mask=in_row, other=0.0).to(tl.float32)
    return tl.where(in_row, (q + alpha_0 * z) * inv_alpha_tilde, float("-inf"))


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
    inv_alpha_tilde = 1.0 / alpha_tilde
    cols = tl.arange(0, BLOCK_V)

    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        c = _combined(z_row, q_row, start + cols, V, alpha_0, inv_alpha_tilde)
        m_new = tl.maximum(m, tl.max(c, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(c - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)

    for start in range(0, V, BLOCK_V):
        c = _combined(z_row, q_row, start + cols, V, alpha_0, inv_alpha_tilde)
        tl.store(out_row + start + cols, c - lse, mask=start + cols < V)


def combine_last(
    base_logits: torch.Tensor, q_values: torch.Tensor, *, alpha_tilde: float = 1.0, alpha_0: float = 0.01
) -> torch.Tensor:
    """Combined-policy log-probs ``[..., V]`` in float32 (typically ``[B, V]``, the last position)."""
    alpha_tilde = _check_real("alpha_tilde", alpha_tilde, positive=True)
    alpha_0 = _check_real("alpha_0", alpha_0)
    _check_float_tensor("base_logits", base_logits)
    _check_float_tensor("q_values", q_values)
    if base_logits.shape != q_values.shape or base_logits.dim() == 0:
        raise ValueError(
            f"q_values must have base_logits' shape {tuple(base_logits.shape)} ([..., V]); got {tuple(q_values.shape)}"
        )
    if base_logits.device != q_values.device:
        raise ValueError(f"q_values must be on base_logits' device {base_logits.device}; got {q_values.device}")
    check_kernel_inputs("decode combine", base_logits, q_values)
    vocab = base_logits.shape[-1]
    z = row_major(base_logits.reshape(-1, vocab))
    q = row_major(q_values.reshape(-1, vocab))
    out = torch.empty(z.shape, dtype=torch.float32, device=z.device)
    if out.numel():
        _combine_kernel[(z.shape[0],)](
            z, q, out,
            vocab, z.stride(0), q.stride(0), out.stride(0),
            alpha_tilde, alpha_0,
            BLOCK_V=min(_MAX_BLOCK_V, triton.next_power_of_2(vocab)),
            num_warps=_NUM_WARPS,
        )
    return out.reshape(base_logits.shape)
