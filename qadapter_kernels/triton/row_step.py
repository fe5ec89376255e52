"""Triton row step: the ``RowStep`` contract of ``steps.py`` as one kernel launch per chunk.

From the two ``[C, V]`` GEMM outputs of a chunk (base logits ``z``, Q-values ``q``) it produces

    q_taken[t] = q[t, a_t]
    value[t]   = alpha~ * lse((q_t + alpha_0 * log_softmax(z_t)) / alpha~)
               = alpha~ * lse(c_t) - alpha_0 * lse(z_t),     c_t = (q_t + alpha_0 * z_t) / alpha~
    p[t, :]    = softmax(c_t) = exp(c_t - lse(c_t))

One program owns one row. Pass 1 streams the row once, keeping running (max, sum) statistics of
``z`` and ``c`` (online logsumexp, so no ``[V]`` temporary and no extra pass for the max); pass 2
streams it again to write ``p``. With a soft cap s (``SOFTCAP``) both are capped as they are read,
``s * tanh(x / s)``, and ``p`` comes out times the cap's slope on Q (``steps.RowStep``): no eager
pass over the tile. Everything is computed in float32 whatever the input dtype, and
row offsets are int64 so ``C * V`` may exceed 2**31. ``p`` is written into ``q``'s buffer when
the dtypes allow it (the contract lets the step overwrite its inputs): the chunk then needs no
third ``[C, V]`` buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..steps import FILTER_BLOCK, kernel_block_stats
from ._common import INTERPRET, check_kernel_inputs, launch_guard, row_major, soft_cap, soft_cap_slope

# A memory-bound kernel: blocks large enough to keep many loads in flight per warp. The
# interpreter uses a small block so that tests cross several blocks with small vocabularies.
MAX_BLOCK_V = 64 if INTERPRET else 4096
NUM_WARPS = 8


@triton.jit
def load_block(z_row, q_row, cols, V, alpha_0, inv_alpha_tilde, softcap, SOFTCAP: tl.constexpr):
    """Float32 ``z``, ``c`` and ``q`` of one block of a row (capped with ``SOFTCAP``), ``z`` and
    ``c`` ``-inf`` past the end of the row."""
    in_row = cols < V
    z = tl.load(z_row + cols, mask=in_row, other=0.0).to(tl.float32)
    q = tl.load(q_row + cols, mask=in_row, other=0.0).to(tl.float32)
    if SOFTCAP:
        z, q = soft_cap(z, softcap), soft_cap(q, softcap)
    c = (q + alpha_0 * z) * inv_alpha_tilde
    return tl.where(in_row, z, float("-inf")), tl.where(in_row, c, float("-inf")), q


@triton.jit
def online_lse(m, s, x):
    """Running (max, sum of exp(x - max)) after one more block ``x``.

    While every value so far is ``-inf`` (a masked or ``-inf``-biased first block), the running
    max stays ``-inf`` and ``exp(-inf - -inf)`` would be NaN: shift by 0 instead, as the CUDA
    row step does.
    """
    m_new = tl.maximum(m, tl.max(x, axis=0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)


@triton.jit
def write_policy(z_row, q_row, p_row, cols, V, alpha_0, inv_alpha_tilde, lse_c, softcap, SOFTCAP: tl.constexpr):
    """Writes one block of the row's ``p`` (times the cap's slope on Q with ``SOFTCAP``); returns the
    policy itself, 0 past the end of the row."""
    _, c, q = load_block(z_row, q_row, cols, V, alpha_0, inv_alpha_tilde, softcap, SOFTCAP)
    p = tl.exp(c - lse_c)
    out = p * soft_cap_slope(q, softcap) if SOFTCAP else p
    tl.store(p_row + cols, out.to(p_row.dtype.element_ty), mask=cols < V)
    return p


@triton.jit
def _row_step_kernel(
    z_ptr, q_ptr, targets_ptr, p_ptr, q_taken_ptr, value_ptr, stats_ptr,
    V, stride_z, stride_q, stride_p, n_blocks,
    alpha_tilde, alpha_0, softcap,
    SOFTCAP: tl.constexpr, STATS: tl.constexpr, FILTER: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    q_row = q_ptr + row * stride_q
    p_row = p_ptr + row * stride_p
    # Float32 scalars: torch.compile hands Python floats to Triton as float64.
    alpha_0 = tl.cast(alpha_0, tl.float32)
    inv_alpha_tilde = 1.0 / tl.cast(alpha_tilde, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    cols = tl.arange(0, BLOCK_V)

    # The target's Q-value is read before anything is written: p may alias q, and other warps
    # of this program write p in pass 2 with no barrier in between.
    target = tl.load(targets_ptr + row)
    q_taken = tl.load(q_row + target).to(tl.float32)
    if SOFTCAP:
        q_taken = soft_cap(q_taken, softcap)

    # Pass 1: statistics.
    m_z = float("-inf")
    s_z = 0.0
    m_c = float("-inf")
    s_c = 0.0
    for start in range(0, V, BLOCK_V):
        z, c, _ = load_block(z_row, q_row, start + cols, V, alpha_0, inv_alpha_tilde, softcap, SOFTCAP)
        m_z, s_z = online_lse(m_z, s_z, z)
        m_c, s_c = online_lse(m_c, s_c, c)
    lse_z = m_z + tl.log(s_z)
    lse_c = m_c + tl.log(s_c)

    tl.store(q_taken_ptr + row, q_taken)
    tl.store(value_ptr + row, alpha_tilde * lse_c - alpha_0 * lse_z)

    # Pass 2: the policy. Reads each element before this program overwrites it (p may alias q).
    if STATS:  # FILTER columns at a time (BLOCK_V divides FILTER): each one's sum of p
        for b0 in range(0, V, FILTER):
            b_sum = 0.0
            for off in range(0, FILTER, BLOCK_V):
                p = write_policy(z_row, q_row, p_row, b0 + off + cols, V, alpha_0, inv_alpha_tilde, lse_c, softcap,
                                 SOFTCAP)
                b_sum += tl.sum(p, axis=0)
            tl.store(stats_ptr + row * n_blocks + b0 // FILTER, b_sum)
    else:
        for start in range(0, V, BLOCK_V):
            write_policy(z_row, q_row, p_row, start + cols, V, alpha_0, inv_alpha_tilde, lse_c, softcap, SOFTCAP)


def triton_row_step(
    z: torch.Tensor,
    q: torch.Tensor,
    targets: torch.Tensor,
    alpha_tilde: float,
    alpha_0: float,
    p_dtype: torch.dtype,
    softcap: float | None = None,
    block_stats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q_taken [C] fp32, value [C] fp32, p [C, V] p_dtype)``; see ``steps.RowStep``.

    ``p`` reuses ``q``'s memory when ``q`` is row-major in ``p_dtype``; ``q`` is then overwritten.
    ``block_stats`` (gradient filtering) are written by the pass that writes ``p``.
    """
    check_kernel_inputs("row step", z, q)
    if z.shape != q.shape or z.dim() != 2:
        raise ValueError(f"z and q must both be [C, V]; got {tuple(z.shape)} and {tuple(q.shape)}")
    rows, vocab = q.shape
    z, q = row_major(z), row_major(q)
    targets = targets.to(device=q.device, dtype=torch.int64).contiguous()
    p = q if q.dtype == p_dtype else torch.empty(rows, vocab, dtype=p_dtype, device=q.device)
    q_taken = torch.empty(rows, dtype=torch.float32, device=q.device)
    value = torch.empty(rows, dtype=torch.float32, device=q.device)
    stats = value if block_stats is None else kernel_block_stats(block_stats, rows, vocab)
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    if rows:
        with launch_guard(q):
            _row_step_kernel[(rows,)](
                z, q, targets, p, q_taken, value, stats,
                vocab, z.stride(0), q.stride(0), p.stride(0), stats.shape[1] if block_stats is not None else 0,
                float(alpha_tilde), float(alpha_0), float(softcap or 0.0),
                SOFTCAP=softcap is not None, STATS=block_stats is not None, FILTER=FILTER_BLOCK,
                BLOCK_V=min(block_v, FILTER_BLOCK) if block_stats is not None else block_v,
                num_warps=NUM_WARPS,
            )
    return q_taken, value, p
