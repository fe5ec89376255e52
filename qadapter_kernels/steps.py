"""The step contracts of the chunked pipeline, and their eager PyTorch implementations.

A *row step* turns one chunk's base logits ``z`` and Q-values ``q`` (whole vocabulary rows) into
what the loss needs per token and the combined policy ``p``; a *block step* does the same for one
vocabulary tile and reports the tile's log-sum-exps for the caller to merge. The eager steps here
run everywhere; the compiled CPU step (``_cpu.py``), the Triton step (``triton/row_step.py``) and
the CUDA step (``csrc/row_step.cu``) are single-pass versions of the same contracts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .inputs import stats_dtype

# row_step(z, q, targets, alpha_tilde, alpha_0, p_dtype, softcap=None, block_stats=None) -> (q_taken, value, p)
#   z, q:     [C, V] base logits and Q-values as produced by the GEMMs; the step may overwrite them.
#   targets:  [C] int64 token ids (the scored tokens' labels).
#   q_taken:  [C] Q[t, a_t];  value: [C] alpha~ * lse((Q + alpha_0 * log_softmax(z)) / alpha~);
#             both in float32 (float64 for float64 inputs).
#   p:        [C, V] softmax((Q + alpha_0 * z) / alpha~) in p_dtype (may alias z or q).
#   softcap:  s > 0: z and q are the raw GEMM outputs and the step caps both, s * tanh(x / s), as
#             it reads them (Gemma-2's final logit soft-capping): everything above is of the capped
#             logits, and p comes out times the cap's slope on Q, 1 - (Q / s)^2, the factor every
#             use of p in the gradient takes (E_p[(1 - tanh^2) Wq], dQ).
#   block_stats: optional, as the block step's below (the row being one tile): gradient filtering.
RowStep = Callable[..., tuple]


# block_step(z, q, alpha_tilde, alpha_0, p_dtype, block_stats=None, softcap=None) -> (lse_c, lse_z, p):
# the same for one vocabulary tile
#   z, q:         [C, Vt] the tile's base logits and Q-values (contiguous); the step may overwrite them.
#   lse_c, lse_z: [C] the tile's log-sum-exps of c = (q + alpha_0 z) / alpha~ and of z, float32
#                 (float64 for float64 inputs): the caller merges the tiles' shares.
#   p:            [C, Vt] exp(c - lse_c), the tile's own softmax, in p_dtype (may alias z or q);
#                 under a soft cap, times its slope on Q (as the row step's).
#   block_stats:  optional [C, ceil(Vt / FILTER_BLOCK)] in the statistics dtype (float32; float64
#                 for float64 inputs), filled with the sum of p of each FILTER_BLOCK columns of the
#                 tile, the probability the block holds (gradient filtering; the policy itself,
#                 never weighted by a cap's slope).
BlockStep = Callable[..., tuple]

# Columns per block of gradient filtering: the compiled CPU step's sweep block (csrc/cpu_row_step.c,
# BLOCK), whose per-block sum is the block's mass: no extra pass.
FILTER_BLOCK = 1024


def _logsumexp_(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row log-sum-exp that overwrites ``x`` with ``exp(x - max)`` (no temporary ``[C, V]`` buffer).

    A row that is all -inf (a masked vocabulary tile) shifts by 0: its lse is -inf, and its sum is
    returned as the smallest normal number rather than 0, so that ``x / sums`` is 0, not NaN.
    """
    row_max = x.amax(dim=1, keepdim=True)
    row_max = torch.where(row_max == -float("inf"), 0.0, row_max)
    exps = x.sub_(row_max).exp_()
    sums = exps.sum(dim=1, keepdim=True)
    return (row_max + sums.log()).squeeze(1), sums.clamp_min_(torch.finfo(sums.dtype).tiny)


def kernel_block_stats(block_stats: torch.Tensor, rows: int, vocab: int) -> torch.Tensor:
    """``block_stats`` checked to be what a compiled step writes: a contiguous float32
    ``[rows, ceil(vocab / FILTER_BLOCK)]``."""
    shape = (rows, -(-vocab // FILTER_BLOCK))
    if block_stats.dtype != torch.float32 or tuple(block_stats.shape) != shape or not block_stats.is_contiguous():
        raise ValueError(f"block_stats must be a contiguous float32 tensor of shape {shape}, got "
                         f"{block_stats.dtype} {tuple(block_stats.shape)}")
    return block_stats


def block_stats_(p: torch.Tensor, block_stats: torch.Tensor) -> torch.Tensor:
    """``block_stats[:, b]`` = the sum of ``p[:, b * FILTER_BLOCK : (b + 1) * FILTER_BLOCK]`` (the eager way)."""
    rows, width = p.shape
    full = width // FILTER_BLOCK
    if full:
        torch.sum(p[:, : full * FILTER_BLOCK].reshape(rows, full, FILTER_BLOCK), dim=2, out=block_stats[:, :full])
    if full * FILTER_BLOCK < width:
        torch.sum(p[:, full * FILTER_BLOCK:], dim=1, out=block_stats[:, full])
    return block_stats


def softcap_(logits: torch.Tensor, softcap: float, slope: torch.Tensor | None = None) -> torch.Tensor:
    """Caps ``logits`` in place, ``softcap * tanh(logits / softcap)`` (computed in float32 at least),
    the model's final logit soft-capping (Gemma-2); with ``slope``, writes ``d capped / d raw =
    1 - tanh^2`` into it. Every eager pass that forms capped logits caps through here."""
    wide = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    tanh = wide.div_(softcap).tanh_()
    if slope is not None:
        torch.mul(tanh, tanh, out=slope).neg_().add_(1)
    if wide is logits:
        return logits.mul_(softcap)
    return logits.copy_(tanh.mul_(softcap))


def torch_block_step(z, q, alpha_tilde, alpha_0, p_dtype, block_stats=None, softcap=None):
    """Eager block step: reuses the GEMM buffers in place, no ``[C, V]`` temporaries beyond them
    (under a soft cap, one: the slope)."""
    sd = stats_dtype(q.dtype)
    z, q = z.to(sd), q.to(sd)
    slope = None
    if softcap is not None:
        slope = torch.empty_like(q)
        softcap_(z, softcap)
        softcap_(q, softcap, slope)
    combined = q.add_(z, alpha=alpha_0)  # alpha_0 * lse(z) cancels inside the softmax
    if alpha_tilde != 1.0:
        combined.div_(alpha_tilde)
    lse_c, sums = _logsumexp_(combined)
    p = combined.div_(sums)
    if block_stats is not None:
        block_stats_(p, block_stats)
    if slope is not None:
        p.mul_(slope)
    lse_z, _ = _logsumexp_(z)
    return lse_c, lse_z, p.to(p_dtype)


def torch_row_step(z, q, targets, alpha_tilde, alpha_0, p_dtype, softcap=None, block_stats=None):
    """Eager row step: the target's Q, then the block step over whole rows."""
    q_taken = q.gather(1, targets.unsqueeze(1)).squeeze(1).to(stats_dtype(q.dtype))
    if softcap is not None:
        q_taken = softcap_(q_taken, softcap)
    lse_c, lse_z, p = torch_block_step(z, q, alpha_tilde, alpha_0, p_dtype, block_stats, softcap)
    return q_taken, alpha_tilde * lse_c - alpha_0 * lse_z, p


def whole_row_block_step(row_step: RowStep) -> BlockStep:
    """A row step as the block step of one tile spanning the vocabulary (the fused GPU row steps).

    Its ``value / alpha~`` stands in for ``lse_c``, with ``lse_z = 0``: a single tile's shares pass
    through the merge unchanged, so ``alpha~ lse_c - alpha_0 lse_z`` gives the value back and ``p``
    keeps its weight ``exp(lse_c - lse_c) = 1``.
    """

    def block_step(z, q, alpha_tilde, alpha_0, p_dtype, block_stats=None, softcap=None):
        targets = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)  # q_taken is read by the caller
        _, value, p = row_step(z, q, targets, alpha_tilde, alpha_0, p_dtype, softcap=softcap, block_stats=block_stats)
        return value / alpha_tilde, torch.zeros_like(value), p

    return block_step
