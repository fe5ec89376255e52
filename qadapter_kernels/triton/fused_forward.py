"""Forward kernel of the fused token statistics: per token block and vocabulary split, the online
log-sum-exps of ``z`` and ``c`` and the target's ``Q`` (``fused.py`` has the whole picture)."""

from __future__ import annotations

import triton
import triton.language as tl

from .fused_tiles import CONFIGS, TUNE_KEY, logit_tiles, online_lse_rows


@triton.autotune(configs=CONFIGS, key=TUNE_KEY)
@triton.jit
def _forward_kernel(
    base_ptr, hq_ptr, w_ptr, wq_ptr, bias_ptr, targets_ptr,
    q_taken_ptr, lse_z_ptr, lse_c_ptr,
    N, V, D, N_BUCKET, split_size,
    stride_base, stride_hq, stride_w, stride_wq, softcap,
    alpha_tilde, alpha_0,
    SHARED: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (token blocks, splits): per-split ``lse(z)``, ``lse(c)`` ([S, N]) and ``q[t, a_t]``."""
    # Float32 scalars: torch.compile hands Python floats to Triton as float64.
    alpha_tilde, alpha_0 = tl.cast(alpha_tilde, tl.float32), tl.cast(alpha_0, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows < N
    targets = tl.load(targets_ptr + rows, mask=n_mask, other=-1)
    v_lo = split * split_size
    v_hi = tl.minimum(v_lo + split_size, V)

    m_z = tl.full([BLOCK_N], float("-inf"), tl.float32)
    m_c = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    s_c = tl.zeros([BLOCK_N], dtype=tl.float32)
    q_taken = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        v_mask = cols < v_hi
        z, q = logit_tiles(
            base_ptr, hq_ptr, w_ptr, wq_ptr, bias_ptr, rows, n_mask, cols, v_mask, D,
            stride_base, stride_hq, stride_w, stride_wq, softcap,
            SHARED, HAS_BIAS, SOFTCAP, DOT_PREC, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        c = tl.where(v_mask[None, :], (q + alpha_0 * z) * (1.0 / alpha_tilde), float("-inf"))
        m_c, s_c = online_lse_rows(m_c, s_c, c)
        m_z, s_z = online_lse_rows(m_z, s_z, tl.where(v_mask[None, :], z, float("-inf")))
        q_taken += tl.sum(tl.where(cols[None, :] == targets[:, None], q, 0.0), axis=1)

    out = split.to(tl.int64) * N + rows
    tl.store(lse_z_ptr + out, m_z + tl.log(s_z), mask=n_mask)
    tl.store(lse_c_ptr + out, m_c + tl.log(s_c), mask=n_mask)
    # Exactly one split holds each target, so each q_taken is written once.
    tl.store(q_taken_ptr + rows, q_taken, mask=n_mask & (targets >= v_lo) & (targets < v_hi))
