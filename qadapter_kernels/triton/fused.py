"""Fully fused, no-logits token statistics: ``(Q[t, a_t], V_t)`` without any ``[N, V]`` tensor.

The chunked backend materializes ``[chunk, V]`` logits; here they only ever exist as on-chip
tiles (the idea of Cut Cross-Entropy, Wijmans et al. 2024). For a tile of tokens x vocabulary,
the base logits ``z = h_b W^T`` and the Q-values ``q = h_q Wq^T (+ bq)`` are accumulated by
``tl.dot`` over blocks of the hidden size; with the shared frozen head (``Wq is W``, the default)
each ``W`` tile is loaded once for both products. Extra memory is ``O(N * d)``.

Files: ``fused_forward.py`` (the forward kernel), ``fused_backward.py`` (the two backward
kernels), ``fused_tiles.py`` (configurations, the launch plan, the shared tile helpers), and this
file: the autograd Function and the entry points.

Forward (``_forward_kernel``): per token block, a loop over the vocabulary keeps online
logsumexp statistics of ``z`` and of the combined logits ``c = (q + alpha_0 z) / alpha~`` and
picks ``q[t, a_t]``. ``V_t = alpha~ lse(c_t) - alpha_0 lse(z_t)``. Two GEMM-equivalents.

Backward, from the closed form of docs/design.md, "The gradient in closed form" (``p_t = softmax(c_t)``):

    dL/dh_q[t] = g_v[t] * E_{p_t}[Wq] + g_a[t] * Wq[a_t]          (g_a, g_v: grads of q_taken, value)
    dL/dWq     = sum_t dQ[t]^T h_q[t],   dL/dbq = sum_t dQ[t],     dQ = g_a onehot(a) + g_v p

``_expected_weight_kernel`` recomputes the tiles and accumulates ``E_p[Wq] = p @ Wq`` (three
GEMM-equivalents); the rest of ``dL/dh_q`` is an ``[N, d]`` gather done by torch. ``E_p[Wq]`` does
not depend on the incoming gradient, so ``p`` (in [0, 1]; times 2**15 in float16) is what goes
through the half-precision dot, never ``g_v * p``, which underflows float16 at real vocabulary sizes. Only a trainable Q
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

Cost (docs/design.md, "Performance model"). Forward: 2 GEMM-equivalents, compute-bound, no
``[N, V]`` traffic. Backward: 3 more (5 in all), plus the read-modify-write of the ``[BLOCK_N, d]``
float32 rows of ``E_p[Wq]`` once per vocabulary tile, ``8 * N * V * d / BLOCK_V`` bytes (a
trainable head adds ``8 * N * V * d / BLOCK_N`` for ``dWq``), far more than the ``~6 * N * V * 2``
bytes the chunked pipeline moves for its ``[chunk, V]`` buffers. So "auto" never picks this path
for training (bench/results/ has the measurements); it serves where the forward is all that runs
or ``grad_filter_eps`` skips most tiles.
"""


from __future__ import annotations

import torch
import triton

from ..registry import StatsOptions
from ..tiles import softcap_slope
from ._common import check_kernel_inputs, launch_guard, row_major
from .fused_backward import _expected_weight_kernel, _head_grad_kernel
from .fused_forward import _forward_kernel
from .fused_tiles import FP16_P_SCALE, FusedPlan, kernel_args, make_plan, n_bucket


class FusedTokenStats(torch.autograd.Function):
    """``(q_taken, value)`` of packed tokens; gradients to ``hq``, ``q_weight``, ``q_bias`` only."""

    @staticmethod
    def forward(ctx, base, hq, weight, q_weight, q_bias, targets, plan: FusedPlan):
        ptrs, (n, vocab, hidden), strides = kernel_args(base, hq, weight, q_weight, q_bias)
        q_taken = torch.empty(n, dtype=torch.float32, device=hq.device)
        lse_z = torch.empty(plan.splits, n, dtype=torch.float32, device=hq.device)
        lse_c = torch.empty(plan.splits, n, dtype=torch.float32, device=hq.device)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), plan.splits)  # noqa: E731
        _forward_kernel[grid](
            *ptrs, targets, q_taken, lse_z, lse_c,
            n, vocab, hidden, n_bucket(n), plan.split_size, *strides, plan.softcap,
            plan.alpha_tilde, plan.alpha_0,
            SHARED=plan.shared, HAS_BIAS=q_bias is not None, SOFTCAP=plan.softcap > 0, DOT_PREC=plan.dot_precision,
        )
        # Fixed-order reduction of the per-split statistics.
        lse_z, lse_c = torch.logsumexp(lse_z, dim=0), torch.logsumexp(lse_c, dim=0)
        value = plan.alpha_tilde * lse_c - plan.alpha_0 * lse_z
        ctx.save_for_backward(base, hq, weight, q_weight, q_bias, targets, lse_c, q_taken)
        ctx.plan = plan
        return q_taken, value

    @staticmethod
    def backward(ctx, grad_q_taken, grad_value):
        base, hq, weight, q_weight, q_bias, targets, lse_c, q_taken = ctx.saved_tensors
        with launch_guard(hq):
            return _backward(ctx, base, hq, weight, q_weight, q_bias, targets, lse_c, q_taken, grad_q_taken, grad_value)


def _backward(ctx, base, hq, weight, q_weight, q_bias, targets, lse_c, q_taken, grad_q_taken, grad_value):
    """``FusedTokenStats.backward``, on ``hq``'s device."""
    plan: FusedPlan = ctx.plan
    ptrs, (n, vocab, hidden), strides = kernel_args(base, hq, weight, q_weight, q_bias)
    grad_q_taken, grad_value = grad_q_taken.float().contiguous(), grad_value.float().contiguous()
    common = dict(SHARED=plan.shared, HAS_BIAS=q_bias is not None, SOFTCAP=plan.softcap > 0,
                  FILTER=plan.filter_eps > 0, DOT_PREC=plan.dot_precision)
    grad_hq = grad_qw = grad_qb = None
    half = hq.dtype == torch.float16
    p_scale = FP16_P_SCALE if half else 1.0
    if ctx.needs_input_grad[1]:
        expected = torch.zeros(plan.splits, n, hidden, dtype=torch.float32, device=hq.device)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), plan.splits)  # noqa: E731
        _expected_weight_kernel[grid](
            *ptrs, lse_c, expected,
            n, vocab, hidden, n_bucket(n), plan.split_size, *strides, plan.softcap,
            plan.alpha_tilde, plan.alpha_0, plan.filter_eps, P_SCALE=p_scale, **common,
        )
        expected = expected[0] if plan.splits == 1 else expected.sum(dim=0)
        if p_scale != 1.0:
            expected.mul_(1.0 / p_scale)
        # Under a soft cap the target's term has the slope 1 - (Q[a] / s)^2 (the kernel's E_p has its own).
        g_taken = grad_q_taken * softcap_slope(q_taken, plan.softcap) if plan.softcap > 0 else grad_q_taken
        grad_hq = torch.addcmul(
            grad_value.unsqueeze(1) * expected, g_taken.unsqueeze(1), q_weight[targets].float()
        ).to(hq.dtype)
    want_w, want_b = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    if want_w or want_b:
        grad_b = torch.empty(vocab, dtype=torch.float32, device=hq.device)
        grad_w = torch.zeros(vocab, hidden, dtype=torch.float32, device=hq.device) if want_w else grad_b
        grid = lambda meta: (triton.cdiv(vocab, meta["BLOCK_V"]),)  # noqa: E731
        _head_grad_kernel[grid](
            *ptrs, targets, lse_c, grad_q_taken, grad_value, grad_w, grad_b,
            n, vocab, hidden, n_bucket(n), *strides, plan.softcap,
            plan.alpha_tilde, plan.alpha_0, plan.filter_eps,
            WANT_W=want_w, WANT_B=want_b, SCALE_DQ=half, **common,
        )
        grad_qw = grad_w.to(q_weight.dtype) if want_w else None
        grad_qb = grad_b.to(q_bias.dtype) if want_b else None
    return None, grad_hq, None, grad_qw, grad_qb, None, None


def fused_token_stats(base: torch.Tensor, hq: torch.Tensor, weight: torch.Tensor, q_weight: torch.Tensor,
                      q_bias: torch.Tensor | None, targets: torch.Tensor,
                      options: StatsOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``token_stats`` contract (:class:`registry.TokenStatsFn`) with no ``[N, V]`` tensor ever
    formed (``options.chunk_size`` has nothing to bound).

    float16 / bfloat16 / float32 inputs; float64 is refused with a TypeError (Triton has no float64
    tensor-core dot; ``chunked`` serves float64 exactly). The soft cap applies to every tile, its
    slope entering the backward's products. ``options.grad_filter_eps`` > 0: the backward skips the
    ``p @ Wq`` / ``dQ^T h_q`` products of a (tokens x vocabulary) tile whose policy values ``p`` are
    all below it and (for ``dWq``) that holds no target (docs/design.md). The vocabulary is split
    into ranges processed by separate programs, enough to fill the GPU (``fused_tiles.vocab_splits_for``),
    their partials reduced in a fixed order.
    """
    check_kernel_inputs("token statistics", base, hq, weight, q_weight)
    if q_bias is not None:
        check_kernel_inputs("token statistics", q_bias)
    plan = make_plan(base, hq, weight, q_weight, options)
    targets = targets.to(device=hq.device, dtype=torch.int64).contiguous()
    with launch_guard(hq):
        return FusedTokenStats.apply(
            row_major(base.detach()), row_major(hq), row_major(weight.detach()), row_major(q_weight),
            q_bias.contiguous() if q_bias is not None else None, targets, plan,
        )
