"""Fully fused, no-logits token statistics: ``(Q[t, a_t], V_t)`` without any ``[N, V]`` tensor.

The chunked backend materializes ``[chunk, V]`` logits; here they only ever exist as on-chip
tiles (the idea of Cut Cross-Entropy, Wijmans et al. 2024). For a tile of tokens x vocabulary,
the base logits ``z = h_b W^T`` and the Q-values ``q = h_q Wq^T (+ bq)`` are accumulated by
``tl.dot`` over blocks of the hidden size; with the shared frozen head (``Wq is W``, the default)
each ``W`` tile is loaded once for both products. Extra memory is ``O(N * d)``.

Forward (``_forward_kernel``): per token block, a loop over the vocabulary keeps online
logsumexp statistics of ``z`` and of the combined logits ``c = (q + alpha_0 z) / alpha~`` and
picks ``q[t, a_t]``. ``V_t = alpha~ lse(c_t) - alpha_0 lse(z_t)``. Two GEMM-equivalents.

Backward, from the closed form of DESIGN section 2 (``p_t = softmax(c_t)``):

    dL/dh_q[t] = g_v[t] * E_{p_t}[Wq] + g_a[t] * Wq[a_t]          (g_a, g_v: grads of q_taken, value)
    dL/dWq     = sum_t dQ[t]^T h_q[t],   dL/dbq = sum_t dQ[t],     dQ = g_a onehot(a) + g_v p

``_expected_weight_kernel`` recomputes the tiles and accumulates ``E_p[Wq] = p @ Wq`` (three
GEMM-equivalents); the rest of ``dL/dh_q`` is an ``[N, d]`` gather done by torch. ``E_p[Wq]`` does
not depend on the incoming gradient, so ``p`` (in [0, 1]) is what goes through the half-precision
dot, never ``g_v * p``, which underflows float16 at real vocabulary sizes. Only a trainable Q
head runs ``_head_grad_kernel``: one program per vocabulary block loops over all tokens, so
``dWq`` and ``dbq`` are reduced in a fixed order without atomics.

Determinism: no atomics anywhere. When the token blocks alone cannot fill the GPU, the forward
and the ``E_p[Wq]`` kernel also split the vocabulary into ``S`` ranges; each split writes its own
partial (``lse`` per split, an ``[S, N, d]`` float32 ``E_p[Wq]``) and torch reduces them in a fixed
order. Results are bitwise reproducible for a given device, shape and configuration.

A program owns the output rows it read-modify-writes; between two updates of the same rows a
``tl.debug_barrier`` (``__syncthreads``) makes the previous store visible to whichever thread
loads it next (the dot result and the load need not share a layout).

Offsets that scale with ``N * d``, ``V * d`` or ``S * N * d`` are int64.

Cost model (DESIGN section 4). Forward: 2 GEMM-equivalents, compute-bound, no ``[N, V]`` traffic.
Backward: 3 more (5 in all), plus the read-modify-write of the ``[BLOCK_N, d]`` float32 rows of
``E_p[Wq]`` once per vocabulary tile: ``8 * N * V * d / BLOCK_V`` bytes (about 70 GB at Llama-3.1-8B
shapes, N=4096, BLOCK_V=256; a trainable head adds ``8 * N * V * d / BLOCK_N`` for ``dWq``), far more than the ``~6 * N * V * 2`` bytes the chunked pipeline moves
for its materialized ``[chunk, V]`` buffers. So the fused path wins on memory (``O(N * d)``), and on
time only where ``grad_filter_eps`` skips most tiles (as Cut Cross-Entropy does) or the forward is
all that runs (evaluation); ``bench/gpu_check.py`` measures both paths on the same device.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_kernel_inputs, dot_precision, launch_guard, row_major

if INTERPRET:
    # One small tile shape: fast on CPU, and small vocabularies still span several tiles.
    _CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16}, num_warps=1, num_stages=1)]
else:
    # Checked by compiling them all (python -m qadapter_kernels.triton.aot_check): on sm_90 in
    # bfloat16 none spills (232-255 registers, no local memory). At most 64 float32 accumulator
    # registers per thread per logit tile: two tiles (z and q) stay in registers. Configurations
    # over an architecture's shared-memory limit are skipped by the autotuner as out of resources.
    _CONFIGS = [
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=2),
    ]
    if os.environ.get("QADAPTER_TRITON_AUTOTUNE") == "0":  # the first configuration only: quick GPU tests
        _CONFIGS = _CONFIGS[:1]
# Vocabulary splits start on a multiple of every tile width, so no tile straddles two splits.
_SPLIT_ALIGN = max(c.kwargs["BLOCK_V"] for c in _CONFIGS)
_NOMINAL_BLOCK_N = 64
# The E_p[Wq] partials, S * N * d float32, stay under this many bytes (S >= 1 regardless).
_PARTIALS_BUDGET = 1 << 30
# float16 policy values are multiplied by this before the E_p[Wq] dot (p <= 1, so p * 2**15 stays
# under float16's maximum) and the float32 result divided by it (a power of two: exact).
_FP16_P_SCALE = 2.0**15
# A configuration tuned for one variant is reused only by the same variant: the head (shared or
# separate), the bias and the token count (bucketed) change the tile footprint and the best shape.
_TUNE_KEY = ["V", "D", "N_BUCKET", "SHARED", "HAS_BIAS"]


def _n_bucket(n: int) -> int:
    """The token count rounded up to a power of two (at least 64): the autotuner's N key."""
    return max(64, triton.next_power_of_2(n))


@triton.jit
def _logit_tiles(
    base_ptr, hq_ptr, w_ptr, wq_ptr, bias_ptr,
    rows, n_mask, cols, v_mask, D,
    stride_base, stride_hq, stride_w, stride_wq,
    SHARED: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Float32 tiles ``z = h_b W^T`` and ``q = h_q Wq^T (+ bq)`` for int64 ``rows`` x ``cols``."""
    z = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    q = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        row_mask = n_mask[:, None] & d_mask[None, :]
        col_mask = d_mask[:, None] & v_mask[None, :]
        h_b = tl.load(base_ptr + rows[:, None] * stride_base + offs_d[None, :], mask=row_mask, other=0.0)
        h_q = tl.load(hq_ptr + rows[:, None] * stride_hq + offs_d[None, :], mask=row_mask, other=0.0)
        w_t = tl.load(w_ptr + cols[None, :] * stride_w + offs_d[:, None], mask=col_mask, other=0.0)
        z = tl.dot(h_b, w_t, z, input_precision=DOT_PREC)
        if SHARED:
            q = tl.dot(h_q, w_t, q, input_precision=DOT_PREC)
        else:
            wq_t = tl.load(wq_ptr + cols[None, :] * stride_wq + offs_d[:, None], mask=col_mask, other=0.0)
            q = tl.dot(h_q, wq_t, q, input_precision=DOT_PREC)
    if HAS_BIAS:
        q += tl.load(bias_ptr + cols, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    return z, q


@triton.jit
def _policy(z, q, lse_c, n_mask, v_mask, alpha_tilde, alpha_0):
    """``p = exp(c - lse(c))`` of a tile, zero outside the real rows and columns."""
    c = (q + alpha_0 * z) * (1.0 / alpha_tilde)
    return tl.where(n_mask[:, None] & v_mask[None, :], tl.exp(c - lse_c[:, None]), 0.0)


@triton.jit
def _online_lse_rows(m, s, x):
    """Per-row running (max, sum of exp(x - max)) after one more tile ``x`` (``-inf`` = absent).

    A row whose values so far are all ``-inf`` (a ``-inf`` bias block) shifts by 0, not by its
    ``-inf`` max, so that ``exp(-inf - -inf)`` never makes a NaN.
    """
    m_new = tl.maximum(m, tl.max(x, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)


@triton.autotune(configs=_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _forward_kernel(
    base_ptr, hq_ptr, w_ptr, wq_ptr, bias_ptr, targets_ptr,
    q_taken_ptr, lse_z_ptr, lse_c_ptr,
    N, V, D, N_BUCKET, split_size,
    stride_base, stride_hq, stride_w, stride_wq,
    alpha_tilde, alpha_0,
    SHARED: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (token blocks, splits): per-split ``lse(z)``, ``lse(c)`` ([S, N]) and ``q[t, a_t]``."""
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
        z, q = _logit_tiles(
            base_ptr, hq_ptr, w_ptr, wq_ptr, bias_ptr, rows, n_mask, cols, v_mask, D,
            stride_base, stride_hq, stride_w, stride_wq,
            SHARED, HAS_BIAS, DOT_PREC, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        c = tl.where(v_mask[None, :], (q + alpha_0 * z) * (1.0 / alpha_tilde), float("-inf"))
        m_c, s_c = _online_lse_rows(m_c, s_c, c)
        m_z, s_z = _online_lse_rows(m_z, s_z, tl.where(v_mask[None, :], z, float("-inf")))
        q_taken += tl.sum(tl.where(cols[None, :] == targets[:, None], q, 0.0), axis=1)

    out = split.to(tl.int64) * N + rows
    tl.store(lse_z_ptr + out, m_z + tl.log(s_z), mask=n_mask)
    tl.store(lse_c_ptr + out, m_c + tl.log(s_c), mask=n_mask)
    # Exactly one split holds each target, so each q_taken is written once.
    tl.store(q_taken_ptr + rows, q_taken, mask=n_mask & (targets >= v_lo) & (targets < v_hi))


@triton.autotune(configs=_CONFIGS, key=_TUNE_KEY, reset_to_zero=["expected_ptr"])
@triton.jit
def _expected_weight_kernel(
    base_ptr, hq_ptr, w_ptr, wq_ptr, bias_ptr, lse_c_ptr,
    expected_ptr,
    N, V, D, N_BUCKET, split_size,
    stride_base, stride_hq, stride_w, stride_wq,
    alpha_tilde, alpha_0, filter_eps,
    SHARED: tl.constexpr, HAS_BIAS: tl.constexpr, FILTER: tl.constexpr, DOT_PREC: tl.constexpr,
    P_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (token blocks, splits): ``expected[split] += P_SCALE * p @ Wq`` over the split's vocabulary.

    ``expected`` is a zeroed ``[S, N, D]`` float32 buffer; this program alone writes its rows.
    ``P_SCALE`` (a power of two) lifts float16 policy values out of the subnormal range.
    """
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
        z, q = _logit_tiles(
            base_ptr, hq_ptr, w_ptr, wq_ptr, bias_ptr, rows, n_mask, cols, v_mask, D,
            stride_base, stride_hq, stride_w, stride_wq,
            SHARED, HAS_BIAS, DOT_PREC, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        p = _policy(z, q, lse_c, n_mask, v_mask, alpha_tilde, alpha_0)
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


@triton.autotune(configs=_CONFIGS, key=_TUNE_KEY, reset_to_zero=["grad_w_ptr"])
@triton.jit
def _head_grad_kernel(
    base_ptr, hq_ptr, w_ptr, wq_ptr, bias_ptr, targets_ptr, lse_c_ptr, g_taken_ptr, g_value_ptr,
    grad_w_ptr, grad_b_ptr,
    N, V, D, N_BUCKET,
    stride_base, stride_hq, stride_w, stride_wq,
    alpha_tilde, alpha_0, filter_eps,
    SHARED: tl.constexpr, HAS_BIAS: tl.constexpr, FILTER: tl.constexpr,
    WANT_W: tl.constexpr, WANT_B: tl.constexpr, DOT_PREC: tl.constexpr, SCALE_DQ: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (vocabulary blocks): ``dWq[cols] = sum_t dQ[t, cols]^T h_q[t]`` and ``dbq[cols]``.

    ``grad_w`` is a zeroed ``[V, D]`` float32 buffer; ``dQ = g_a onehot(a) + g_v p``. With
    ``SCALE_DQ`` (float16) each ``dQ`` tile is divided by its largest magnitude before the
    half-precision dot and the product multiplied back in float32: ``g_v * p`` is often below
    float16's smallest subnormal (6e-8) and would otherwise be flushed to zero.
    """
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
        z, q = _logit_tiles(
            base_ptr, hq_ptr, w_ptr, wq_ptr, bias_ptr, rows, n_mask, cols, v_mask, D,
            stride_base, stride_hq, stride_w, stride_wq,
            SHARED, HAS_BIAS, DOT_PREC, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        p = _policy(z, q, lse_c, n_mask, v_mask, alpha_tilde, alpha_0)
        hit = cols[None, :] == targets[:, None]
        d_q = g_value[:, None] * p + tl.where(hit, g_taken[:, None], 0.0)
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


@dataclass(frozen=True)
class _Plan:
    """Everything the kernels need besides the tensors, fixed in forward and reused in backward."""

    alpha_tilde: float
    alpha_0: float
    shared: bool
    split_size: int
    splits: int
    filter_eps: float
    dot_precision: str


def _vocab_splits(n: int, vocab: int, hidden: int, device: torch.device, requested: int | None) -> int:
    """How many vocabulary ranges to process in parallel: enough programs to fill the GPU."""
    limit = triton.cdiv(vocab, _SPLIT_ALIGN)
    if requested is not None:
        return max(1, min(int(requested), limit))
    if device.type != "cuda" or INTERPRET:
        return 1
    # Several waves of long-running programs, so the last, partial wave costs little.
    programs_wanted = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    splits = triton.cdiv(programs_wanted, triton.cdiv(n, _NOMINAL_BLOCK_N))
    splits = min(splits, max(1, _PARTIALS_BUDGET // max(1, n * hidden * 4)))
    return max(1, min(splits, limit))


def _plan(base, hq, weight, q_weight, alpha_tilde, alpha_0, vocab_splits, grad_filter_eps) -> _Plan:
    vocab, hidden = weight.shape
    splits = _vocab_splits(hq.shape[0], vocab, hidden, hq.device, vocab_splits)
    split_size = _SPLIT_ALIGN * triton.cdiv(triton.cdiv(vocab, splits), _SPLIT_ALIGN)
    shared = (
        q_weight.data_ptr() == weight.data_ptr() and q_weight.stride() == weight.stride()
        and q_weight.dtype == weight.dtype
    )
    return _Plan(
        alpha_tilde=float(alpha_tilde),
        alpha_0=float(alpha_0),
        shared=shared,
        split_size=split_size,
        splits=triton.cdiv(vocab, split_size),
        filter_eps=float(grad_filter_eps),
        dot_precision=dot_precision(hq.dtype),
    )


def _common_args(base, hq, weight, q_weight, q_bias):
    n, hidden = hq.shape
    vocab = weight.shape[0]
    bias = q_bias if q_bias is not None else q_weight  # never read without HAS_BIAS
    return (base, hq, weight, q_weight, bias), (n, vocab, hidden), (
        base.stride(0), hq.stride(0), weight.stride(0), q_weight.stride(0)
    )


class FusedTokenStats(torch.autograd.Function):
    """``(q_taken, value)`` of packed tokens; gradients to ``hq``, ``q_weight``, ``q_bias`` only."""

    @staticmethod
    def forward(ctx, base, hq, weight, q_weight, q_bias, targets, plan: _Plan):
        ptrs, (n, vocab, hidden), strides = _common_args(base, hq, weight, q_weight, q_bias)
        q_taken = torch.empty(n, dtype=torch.float32, device=hq.device)
        lse_z = torch.empty(plan.splits, n, dtype=torch.float32, device=hq.device)
        lse_c = torch.empty(plan.splits, n, dtype=torch.float32, device=hq.device)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), plan.splits)  # noqa: E731
        _forward_kernel[grid](
            *ptrs, targets, q_taken, lse_z, lse_c,
            n, vocab, hidden, _n_bucket(n), plan.split_size, *strides,
            plan.alpha_tilde, plan.alpha_0,
            SHARED=plan.shared, HAS_BIAS=q_bias is not None, DOT_PREC=plan.dot_precision,
        )
        # Fixed-order reduction of the per-split statistics.
        lse_z, lse_c = torch.logsumexp(lse_z, dim=0), torch.logsumexp(lse_c, dim=0)
        value = plan.alpha_tilde * lse_c - plan.alpha_0 * lse_z
        ctx.save_for_backward(base, hq, weight, q_weight, q_bias, targets, lse_c)
        ctx.plan = plan
        return q_taken, value

    @staticmethod
    def backward(ctx, grad_q_taken, grad_value):
        base, hq, weight, q_weight, q_bias, targets, lse_c = ctx.saved_tensors
        with launch_guard(hq):
            return _backward(ctx, base, hq, weight, q_weight, q_bias, targets, lse_c, grad_q_taken, grad_value)


def _backward(ctx, base, hq, weight, q_weight, q_bias, targets, lse_c, grad_q_taken, grad_value):
    """``FusedTokenStats.backward``, on ``hq``'s device."""
    plan: _Plan = ctx.plan
    ptrs, (n, vocab, hidden), strides = _common_args(base, hq, weight, q_weight, q_bias)
    grad_q_taken, grad_value = grad_q_taken.float().contiguous(), grad_value.float().contiguous()
    common = dict(SHARED=plan.shared, HAS_BIAS=q_bias is not None, FILTER=plan.filter_eps > 0,
                  DOT_PREC=plan.dot_precision)
    grad_hq = grad_qw = grad_qb = None
    half = hq.dtype == torch.float16
    p_scale = _FP16_P_SCALE if half else 1.0
    if ctx.needs_input_grad[1]:
        expected = torch.zeros(plan.splits, n, hidden, dtype=torch.float32, device=hq.device)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), plan.splits)  # noqa: E731
        _expected_weight_kernel[grid](
            *ptrs, lse_c, expected,
            n, vocab, hidden, _n_bucket(n), plan.split_size, *strides,
            plan.alpha_tilde, plan.alpha_0, plan.filter_eps, P_SCALE=p_scale, **common,
        )
        expected = expected[0] if plan.splits == 1 else expected.sum(dim=0)
        if p_scale != 1.0:
            expected.mul_(1.0 / p_scale)
        grad_hq = torch.addcmul(
            grad_value.unsqueeze(1) * expected, grad_q_taken.unsqueeze(1), q_weight[targets].float()
        ).to(hq.dtype)
    want_w, want_b = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    if want_w or want_b:
        grad_b = torch.empty(vocab, dtype=torch.float32, device=hq.device)
        grad_w = torch.zeros(vocab, hidden, dtype=torch.float32, device=hq.device) if want_w else grad_b
        grid = lambda meta: (triton.cdiv(vocab, meta["BLOCK_V"]),)  # noqa: E731
        _head_grad_kernel[grid](
            *ptrs, targets, lse_c, grad_q_taken, grad_value, grad_w, grad_b,
            n, vocab, hidden, _n_bucket(n), *strides,
            plan.alpha_tilde, plan.alpha_0, plan.filter_eps,
            WANT_W=want_w, WANT_B=want_b, SCALE_DQ=half, **common,
        )
        grad_qw = grad_w.to(q_weight.dtype) if want_w else None
        grad_qb = grad_b.to(q_bias.dtype) if want_b else None
    return None, grad_hq, None, grad_qw, grad_qb, None, None


def fused_token_stats(
    base: torch.Tensor,
    hq: torch.Tensor,
    weight: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    alpha_tilde: float,
    alpha_0: float,
    vocab_splits: int | None = None,
    grad_filter_eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_stats` with the kernels' own knobs.

    Args:
        vocab_splits: vocabulary ranges processed by separate programs (each with its own
            partials, reduced in a fixed order). ``None``: enough to fill the GPU, bounded so the
            ``[S, N, d]`` float32 partials of the backward stay under 1 GiB; 1 on CPU.
        grad_filter_eps: when > 0, the backward skips the ``p @ Wq`` / ``dQ^T h_q`` products of a
            (tokens x vocabulary) tile whose policy values ``p`` are all below it and (for
            ``dWq``) that holds no target. This trades exactness for speed: the skipped mass is
            below ``eps`` per entry. Off (0) by default; Cut Cross-Entropy uses ``2**-12`` for bf16.
    """
    check_kernel_inputs("token statistics", base, hq, weight, q_weight)
    if q_bias is not None:
        check_kernel_inputs("token statistics", q_bias)
    if grad_filter_eps < 0 or not math.isfinite(grad_filter_eps):
        raise ValueError(f"grad_filter_eps must be a finite number >= 0; got {grad_filter_eps}")
    plan = _plan(base, hq, weight, q_weight, alpha_tilde, alpha_0, vocab_splits, grad_filter_eps)
    targets = targets.to(device=hq.device, dtype=torch.int64).contiguous()
    with launch_guard(hq):
        return FusedTokenStats.apply(
            row_major(base.detach()), row_major(hq), row_major(weight.detach()), row_major(q_weight),
            q_bias.contiguous() if q_bias is not None else None, targets, plan,
        )


def token_stats(
    base: torch.Tensor,
    hq: torch.Tensor,
    weight: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    alpha_tilde: float,
    alpha_0: float,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``Q[t, a_t]`` and ``V_t`` (float32 ``[N]``), the contract of ``chunked.chunked_token_stats``.

    No ``[N, V]`` tensor is ever formed, so ``chunk_size`` (a memory knob of the chunked backend)
    has nothing to bound and is ignored. float16 / bfloat16 / float32 inputs; float64 is refused
    with a TypeError (Triton has no float64 tensor-core dot; ``chunked`` serves float64 exactly).
    """
    del chunk_size
    return fused_token_stats(base, hq, weight, q_weight, q_bias, targets, alpha_tilde=alpha_tilde, alpha_0=alpha_0)
