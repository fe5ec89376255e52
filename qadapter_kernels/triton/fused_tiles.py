"""What the fused kernels share: tile configurations and autotune key, the launch plan, and the
``triton.jit`` helpers that form logit tiles and their online log-sum-exps (see ``fused.py``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..grad_filter import entry_threshold, mass_budget
from ._common import INTERPRET, dot_precision, soft_cap

if INTERPRET:
    # One small tile shape: fast on CPU, and small vocabularies still span several tiles.
    CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16}, num_warps=1, num_stages=1)]
else:
    # Checked by compiling them all (python -m qadapter_kernels.triton.aot_check): on sm_90 in
    # bfloat16 none spills (232-255 registers, no local memory). At most 64 float32 accumulator
    # registers per thread per logit tile: two tiles (z and q) stay in registers. Configurations
    # over an architecture's shared-memory limit are skipped by the autotuner as out of resources.
    CONFIGS = [
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=2),
    ]
    if os.environ.get("QADAPTER_TRITON_AUTOTUNE") == "0":  # the first configuration only: quick GPU tests
        CONFIGS = CONFIGS[:1]
# Vocabulary splits start on a multiple of every tile width, so no tile straddles two splits.
SPLIT_ALIGN = max(c.kwargs["BLOCK_V"] for c in CONFIGS)
NOMINAL_BLOCK_N = 64
# The E_p[Wq] partials, S * N * d float32, stay under this many bytes (S >= 1 regardless).
PARTIALS_BUDGET = 1 << 30
# float16 policy values are multiplied by this before the E_p[Wq] dot (p <= 1, so p * 2**15 stays
# under float16's maximum) and the float32 result divided by it (a power of two: exact).
FP16_P_SCALE = 2.0**15
# A configuration tuned for one variant is reused only by the same variant: the head (shared or
# separate), the bias and the token count (bucketed) change the tile footprint and the best shape.
TUNE_KEY = ["V", "D", "N_BUCKET", "SHARED", "HAS_BIAS"]


def n_bucket(n: int) -> int:
    """The token count rounded up to a power of two (at least 64): the autotuner's N key."""
    return max(64, triton.next_power_of_2(n))


@triton.jit
def logit_tiles(
    base_ptr, hq_ptr, w_ptr, wq_ptr, bias_ptr,
    rows, n_mask, cols, v_mask, D,
    stride_base, stride_hq, stride_w, stride_wq, softcap,
    SHARED: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Float32 tiles ``z = h_b W^T`` and ``q = h_q Wq^T (+ bq)`` for int64 ``rows`` x ``cols``; with
    ``SOFTCAP``, both capped to ``softcap * tanh(x / softcap)``."""
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
    if SOFTCAP:
        z, q = soft_cap(z, softcap), soft_cap(q, softcap)
    return z, q


@triton.jit
def policy(z, q, lse_c, n_mask, v_mask, alpha_tilde, alpha_0):
    """``p = exp(c - lse(c))`` of a tile, zero outside the real rows and columns."""
    c = (q + alpha_0 * z) * (1.0 / alpha_tilde)
    return tl.where(n_mask[:, None] & v_mask[None, :], tl.exp(c - lse_c[:, None]), 0.0)


@triton.jit
def online_lse_rows(m, s, x):
    """Per-row running (max, sum of exp(x - max)) after one more tile ``x`` (``-inf`` = absent).

    A row whose values so far are all ``-inf`` (a ``-inf`` bias block) shifts by 0, not by its
    ``-inf`` max, so that ``exp(-inf - -inf)`` never makes a NaN.
    """
    m_new = tl.maximum(m, tl.max(x, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)

@dataclass(frozen=True)
class FusedPlan:
    """Everything the kernels need besides the tensors, fixed in forward and reused in backward."""

    alpha_tilde: float
    alpha_0: float
    softcap: float  # 0.0: none
    shared: bool
    split_size: int
    splits: int
    filter_eps: float
    dot_precision: str


def vocab_splits_for(n: int, vocab: int, hidden: int, device: torch.device) -> int:
    """How many vocabulary ranges to process in parallel: enough programs to fill the GPU."""
    limit = triton.cdiv(vocab, SPLIT_ALIGN)
    if device.type != "cuda" or INTERPRET:
        return 1
    # Several waves of long-running programs, so the last, partial wave costs little.
    programs_wanted = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    splits = triton.cdiv(programs_wanted, triton.cdiv(n, NOMINAL_BLOCK_N))
    splits = min(splits, max(1, PARTIALS_BUDGET // max(1, n * hidden * 4)))
    return max(1, min(splits, limit))


def make_plan(base, hq, weight, q_weight, options) -> FusedPlan:
    """The launch plan for ``options`` (``registry.StatsOptions``) at these shapes."""
    vocab, hidden = weight.shape
    splits = min(vocab_splits_for(hq.shape[0], vocab, hidden, hq.device), triton.cdiv(vocab, SPLIT_ALIGN))
    split_size = SPLIT_ALIGN * triton.cdiv(triton.cdiv(vocab, splits), SPLIT_ALIGN)
    shared = (
        q_weight.data_ptr() == weight.data_ptr() and q_weight.stride() == weight.stride()
        and q_weight.dtype == weight.dtype
    )
    return FusedPlan(
        alpha_tilde=float(options.alpha_tilde),
        alpha_0=float(options.alpha_0),
        softcap=float(options.logit_softcap or 0.0),
        shared=shared,
        split_size=split_size,
        splits=triton.cdiv(vocab, split_size),
        filter_eps=entry_threshold(mass_budget(options.grad_filter_eps, hq.dtype), vocab),
        dot_precision=dot_precision(hq.dtype),
    )



def kernel_args(base, hq, weight, q_weight, q_bias):
    n, hidden = hq.shape
    vocab = weight.shape[0]
    bias = q_bias if q_bias is not None else q_weight  # never read without HAS_BIAS
    return (base, hq, weight, q_weight, bias), (n, vocab, hidden), (
        base.stride(0), hq.stride(0), weight.stride(0), q_weight.stride(0)
    )
