"""Backward kernels of the fused token statistics: ``E_p[Wq]`` per token block and vocabulary
split, and a trainable head's ``dWq`` / ``dbq`` per vocabulary block (``fused.py`` has the whole
picture)."""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import soft_cap_slope
from .fused_tiles import CONFIGS, TUNE_KEY, logit_tiles, policy


@triton.autotune(configs=CONFIGS, key=TUNE_KEY, reset_to_zero=["expected_ptr"])
@triton.jit
def _expected_weight_kernel(
    base_ptr, hq_ptr, w_ptr, wq_ptr, bias_ptr, lse_c_ptr,
    expected_ptr,
    N, V, D, N_BUCKET, split_size,
    stride_base, stride_hq, stride_w, stride_wq, softcap,
    alpha_tilde, alpha_0, filter_eps,
    SHARED: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, FILTER: tl.constexpr, DOT_PREC: tl.constexpr,
    P_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (token blocks, splits): ``expected[split] += P_SCALE * p @ Wq`` over the split's vocabulary.

    ``expected`` is a zeroed ``[S, N, D]`` float32 buffer; this program alone writes its rows.
    ``P_SCALE`` (a power of two) lifts float16 policy values out of the subnormal range.
    """
    # Float32 scalars: torch.compile hands Python floats to Triton as float64.
    alpha_tilde, alpha_0 = tl.cast(alpha_tilde, tl.float32), tl.cast(alpha_0, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    filter_eps = tl.cast(filter_eps, tl.float32)
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows < N
    lse_c = tl.load(lse_c_ptr + rows, mask=n_mask, other=0.0)
    out_rows = expected_ptr + (split.to(tl.int64) * N + rows)[:, None] * D
    v_lo = split * split_size
    v_hi = tl.minimum(v_lo + split_size, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        v_mask = cols < v_hi
        z, q = logit_tiles(
            base_ptr, hq_ptr, w_ptr, wq_ptr, bias_ptr, rows, n_mask, cols, v_mask, D,
            stride_base, stride_hq, stride_w, stride_wq, softcap,
            SHARED, HAS_BIAS, SOFTCAP, DOT_PREC, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        p = policy(z, q, lse_c, n_mask, v_mask, alpha_tilde, alpha_0)
        if SOFTCAP:  # E_p[(1 - tanh^2) Wq]
            p = p * soft_cap_slope(q, softcap)
        if FILTER:
            keep = tl.max(tl.max(p, axis=1), axis=0) >= filter_eps
        else:
            keep = True
        if keep:
            p_w = (p * P_SCALE).to(wq_ptr.dtype.element_ty)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_mask = offs_d < D
                wq = tl.load(
                    wq_ptr + cols[:, None] * stride_wq + offs_d[None, :],
                    mask=v_mask[:, None] & d_mask[None, :], other=0.0,
                )
                out = out_rows + offs_d[None, :]
                out_mask = n_mask[:, None] & d_mask[None, :]
                acc = tl.load(out, mask=out_mask, other=0.0)
                tl.store(out, tl.dot(p_w, wq, acc, input_precision=DOT_PREC), mask=out_mask)
        tl.debug_barrier()


@triton.autotune(configs=CONFIGS, key=TUNE_KEY, reset_to_zero=["grad_w_ptr"])
@triton.jit
def _head_grad_kernel(
    base_ptr, hq_ptr, w_ptr, wq_ptr, bias_ptr, targets_ptr, lse_c_ptr, g_taken_ptr, g_value_ptr,
    grad_w_ptr, grad_b_ptr,
    N, V, D, N_BUCKET,
    stride_base, stride_hq, stride_w, stride_wq, softcap,
    alpha_tilde, alpha_0, filter_eps,
    SHARED: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
    WANT_W: tl.constexpr, WANT_B: tl.constexpr, DOT_PREC: tl.constexpr, SCALE_DQ: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (vocabulary blocks): ``dWq[cols] = sum_t dQ[t, cols]^T h_q[t]`` and ``dbq[cols]``.

    ``grad_w`` is a zeroed ``[V, D]`` float32 buffer; ``dQ = g_a onehot(a) + g_v p``. With
    ``SCALE_DQ`` (float16) each ``dQ`` tile is divided by its largest magnitude before the
    half-precision dot and the product multiplied back in float32: ``g_v * p`` is often below
    float16's smallest subnormal (6e-8) and would otherwise be flushed to zero.
    """
    # Float32 scalars: torch.compile hands Python floats to Triton as float64.
    alpha_tilde, alpha_0 = tl.cast(alpha_tilde, tl.float32), tl.cast(alpha_0, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    filter_eps = tl.cast(filter_eps, tl.float32)
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = cols < V
    grad_b = tl.zeros([BLOCK_V], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        n_mask = rows < N
        targets = tl.load(targets_ptr + rows, mask=n_mask, other=-1)
        lse_c = tl.load(lse_c_ptr + rows, mask=n_mask, other=0.0)
        g_taken = tl.load(g_taken_ptr + rows, mask=n_mask, other=0.0)
        g_value = tl.load(g_value_ptr + rows, mask=n_mask, other=0.0)
        z, q = logit_tiles(
            base_ptr, hq_ptr, w_ptr, wq_ptr, bias_ptr, rows, n_mask, cols, v_mask, D,
            stride_base, stride_hq, stride_w, stride_wq, softcap,
            SHARED, HAS_BIAS, SOFTCAP, DOT_PREC, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        p = policy(z, q, lse_c, n_mask, v_mask, alpha_tilde, alpha_0)
        hit = cols[None, :] == targets[:, None]
        d_q = g_value[:, None] * p + tl.where(hit, g_taken[:, None], 0.0)
        if SOFTCAP:
            d_q = d_q * soft_cap_slope(q, softcap)
        if WANT_B:
            grad_b += tl.sum(d_q, axis=0)
        if WANT_W:
            if FILTER:
                keep = (tl.max(tl.max(p, axis=1), axis=0) >= filter_eps) | (tl.max(tl.max(hit, axis=1), axis=0) != 0)
            else:
                keep = True
            if keep:
                scale = 1.0
                if SCALE_DQ:
                    tile_max = tl.max(tl.max(tl.abs(d_q), axis=1), axis=0)
                    scale = tl.where(tile_max > 0, tile_max, 1.0)
                d_q_t = tl.trans((d_q / scale).to(hq_ptr.dtype.element_ty))
                for d0 in range(0, D, BLOCK_D):
                    offs_d = d0 + tl.arange(0, BLOCK_D)
                    d_mask = offs_d < D
                    h_q = tl.load(
                        hq_ptr + rows[:, None] * stride_hq + offs_d[None, :],
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0,
                    )
                    out = grad_w_ptr + cols[:, None] * D + offs_d[None, :]
                    out_mask = v_mask[:, None] & d_mask[None, :]
                    acc = tl.load(out, mask=out_mask, other=0.0)
                    if SCALE_DQ:
                        acc += scale * tl.dot(d_q_t, h_q, input_precision=DOT_PREC)
                    else:
                        acc = tl.dot(d_q_t, h_q, acc, input_precision=DOT_PREC)
                    tl.store(out, acc, mask=out_mask)
            tl.debug_barrier()
    if WANT_B:
        tl.store(grad_b_ptr + cols, grad_b, mask=v_mask)
