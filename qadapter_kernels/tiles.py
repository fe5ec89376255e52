"""The tile engine of the chunked backends: per tile of tokens x vocabulary, the GEMMs (soft cap
included), the block step, and ``E_p[Wq] = p @ Wq`` merged online across a row's tiles; the
autograd Function whose ``q_hidden`` backward is elementwise (docs/design.md, "The gradient in
closed form"), with a second tiled pass only for a trainable Q head.
"""

from __future__ import annotations

import functools

import torch

from . import grad_filter
from .first_order import fused_backward
from .inputs import stats_dtype
from .steps import FILTER_BLOCK, softcap_


def chunks(n: int, chunk: int):
    """``(start, end)`` of at most ``chunk`` rows each, sizes within one row of each other: no short
    last chunk, whose GEMMs would run far below the others' speed."""
    count = -(-n // chunk)
    size, extra = divmod(n, max(count, 1))
    start = 0
    for i in range(count):
        end = start + size + (i < extra)
        yield start, end
        start = end


class ChunkLogits:
    """The base logits ``z`` and Q-values ``q`` of one tile (a chunk of tokens, a range of the
    vocabulary: the whole of it by default), written into one buffer reused by every tile.

    A fresh GEMM output per tile would cost its allocation (page faults on a CPU) every time; the
    row step may overwrite the buffer, as the ``RowStep`` contract allows. A shared head
    (``q_weight`` is ``weight``, no bias: adapters below the lm_head) takes one GEMM over the
    stacked ``[base; hq]`` rows, which runs closer to peak than two half-height ones.

    The logits are raw: a soft cap is the step's to apply (``steps.BlockStep``).
    """

    def __init__(self, base, hq, weight, q_weight, q_bias, chunk: int, columns: int | None = None):
        self.base, self.hq, self.weight, self.q_weight, self.q_bias = base, hq, weight, q_weight, q_bias
        rows = max(1, min(chunk, hq.shape[0]))
        columns = weight.shape[0] if columns is None else min(columns, weight.shape[0])
        self.shared = q_bias is None and _same_tensor(weight, q_weight)
        self.out = torch.empty(2 * rows * columns, dtype=hq.dtype, device=hq.device)
        self.stacked = torch.empty(2 * rows, hq.shape[1], dtype=hq.dtype, device=hq.device) if self.shared else None
        self._stacked_rows = None  # the (start, end) whose [base; hq] rows ``stacked`` holds

    def __call__(self, s: int, e: int, v0: int = 0, v1: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        n, v1 = e - s, self.weight.shape[0] if v1 is None else v1
        out = self.out[: 2 * n * (v1 - v0)].view(2 * n, v1 - v0)
        z, q = out[:n], out[n:]
        if self.shared:
            if self._stacked_rows != (s, e):
                torch.cat((self.base[s:e], self.hq[s:e]), out=self.stacked[: 2 * n])
                self._stacked_rows = (s, e)
            torch.mm(self.stacked[: 2 * n], self.weight[v0:v1].T, out=out)
        else:
            torch.mm(self.base[s:e], self.weight[v0:v1].T, out=z)
            torch.mm(self.hq[s:e], self.q_weight[v0:v1].T, out=q)
            if self.q_bias is not None:
                q.add_(self.q_bias[v0:v1])
        return z, q


def _targets_in_tile(targets: torch.Tensor, v0: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target's column in the tile ``[v0, v0 + width)``, clamped into it, and whether it lies
    there: masks instead of a boolean index, so that no host sync stalls GPU tiles."""
    local = targets - v0
    return local.clamp(0, width - 1), (local >= 0) & (local < width)


def _take_targets_(q_taken: torch.Tensor, q: torch.Tensor, targets: torch.Tensor, v0: int) -> None:
    """``q_taken[i] = q[i, targets[i] - v0]`` for the rows whose target lies in this tile (before the
    block step overwrites ``q``)."""
    column, inside = _targets_in_tile(targets, v0, q.shape[1])
    taken = q.gather(1, column.unsqueeze(1)).squeeze(1)
    q_taken.copy_(torch.where(inside, taken.to(q_taken.dtype), q_taken))


def _merge_(lse: torch.Tensor, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``lse <- log(exp(lse) + exp(part))`` in place; returns the weights ``exp(old - new)`` and
    ``exp(part - new)`` that carry sums taken relative to each over to the new one (0, not NaN,
    where both are -inf: rows whose logits are all masked so far)."""
    new = torch.logaddexp(lse, part)
    empty = new == -float("inf")
    keep = torch.where(empty, 0.0, (lse - new).exp_())
    add = torch.where(empty, 0.0, (part - new).exp_())
    lse.copy_(new)
    return keep, add


def softcap_slope(capped: torch.Tensor, softcap: float) -> torch.Tensor:
    """``d capped / d raw = 1 - tanh^2 = 1 - (capped / softcap)^2`` of soft-capped logits."""
    return 1 - (capped / softcap).square()


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` view the same memory the same way (``detach()`` makes a new object)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


# torch.mm(..., out_dtype=) (a half-precision GEMM with a float32 result) came with torch 2.8.
MM_OUT_DTYPE = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 8)


def _float32_result_mm(a: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether ``matmul_to`` takes ``torch.mm(..., out_dtype=float32)`` for ``a``."""
    return MM_OUT_DTYPE and a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and out_dtype == torch.float32


def matmul_to(out_dtype: torch.dtype, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for operands of one dtype, its result in ``out_dtype`` (float32 statistics).

    On CUDA with torch >= 2.8, float16/bfloat16 products go straight from the tensor cores' float32
    accumulator to a float32 result (``out_dtype``), with no rounding to half precision on the way;
    elsewhere (a CPU, an older torch) the product is rounded once to the operands' dtype.
    """
    if _float32_result_mm(a, out_dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).to(out_dtype)


def _head_weight_grad(d_logits: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``d_logits^T @ h`` in ``d_logits``' float32, with the GEMM in ``h``'s dtype (tensor cores).

    ``d_logits = g_v * p (+ g_a at the targets)`` is mostly far below float16's smallest
    subnormal (6e-8 at real vocabulary sizes): for float16 it is divided by its largest magnitude
    before the cast and the product multiplied back in float32, so nothing is flushed to zero.
    """
    if h.dtype != torch.float16:
        return matmul_to(d_logits.dtype, d_logits.to(h.dtype).T, h)
    scale = d_logits.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    return matmul_to(d_logits.dtype, (d_logits / scale).to(h.dtype).T, h).mul_(scale)


class ChunkedTokenStats(torch.autograd.Function):
    """``(q_taken, value)`` for packed scored tokens, with the elementwise ``q_hidden`` backward.

    ``tiles = (rows, columns)``: tokens and vocabulary entries per tile. Per tile, the GEMMs, the
    block step, and (for the ``q_hidden`` gradient) ``p @ Wq``; the tiles of a row chunk merge their
    log-sum-exps online, rescaling the running ``E_p[Wq]`` as the maximum grows.
    """

    @staticmethod
    def forward(ctx, base, hq, weight, q_weight, q_bias, targets, tiles, block_step, cfg):
        alpha_tilde, alpha_0, softcap, eps = cfg
        (n, d), vocab, (rows, columns) = hq.shape, weight.shape[0], tiles
        sd = stats_dtype(hq.dtype)
        q_taken = torch.full((n,), float("nan"), dtype=sd, device=hq.device)
        lse_c, lse_z = (torch.full((n,), -float("inf"), dtype=sd, device=hq.device) for _ in range(2))
        want_hq_grad = ctx.needs_input_grad[1]
        expected_w = torch.zeros(n, d, dtype=sd, device=hq.device) if want_hq_grad else None
        filtering = want_hq_grad and eps > 0
        block_stats = _BlockStats(rows, columns, sd, hq.device) if filtering else None
        dropped = torch.zeros(n, dtype=sd, device=hq.device) if filtering else None
        entries = skipped = 0
        with torch.no_grad():
            logits = ChunkLogits(base, hq, weight, q_weight, q_bias, rows, columns)
            for s, e in chunks(n, rows):
                for v0, v1 in chunks(vocab, columns):
                    z, q = logits(s, e, v0, v1)
                    _take_targets_(q_taken[s:e], q, targets[s:e], v0)
                    stats = block_stats(e - s, v1 - v0) if filtering else None
                    part_c, part_z, p = block_step(z, q, alpha_tilde, alpha_0, q_weight.dtype,
                                                   block_stats=stats, softcap=softcap)
                    del z, q
                    torch.logaddexp(lse_z[s:e], part_z, out=lse_z[s:e])
                    keep, add = _merge_(lse_c[s:e], part_c)
                    if not want_hq_grad:
                        continue
                    drop = None
                    if filtering:  # add * p bounds p against the row's lse so far, hence its final p
                        dropped[s:e].mul_(keep)
                        drop, left_out = grad_filter.leave_out(stats * add.unsqueeze(1), eps * v1 / vocab,
                                                               dropped[s:e], v1 - v0)
                        entries += p.numel()
                        skipped += left_out
                    weighted = _kept_product(sd, p, q_weight[v0:v1], drop).mul_(add.unsqueeze(1))
                    expected_w[s:e].mul_(keep.unsqueeze(1)).add_(weighted)
        if softcap is not None:  # the targets' Q-values were read raw, before the step capped its tile
            softcap_(q_taken, softcap)
        # Said when the backward runs, once: a checkpointed region runs this forward again for it.
        ctx.filtered = dict(entries=entries, skipped=skipped, dropped_mass=dropped) if filtering else None
        # base and weight are only needed again to recompute p for a trainable Q head.
        head = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        ctx.save_for_backward(base if head else None, hq, weight if head else None, q_weight, q_bias, targets, expected_w,
                              q_taken if softcap is not None else None, lse_c if head else None)
        ctx.tiles, ctx.block_step, ctx.cfg = tiles, block_step, cfg
        return q_taken, alpha_tilde * lse_c - alpha_0 * lse_z

    @staticmethod
    @fused_backward
    def backward(ctx, grad_q_taken, grad_value):
        base, hq, weight, q_weight, q_bias, targets, expected_w, capped_q_taken, lse_c = ctx.saved_tensors
        sd = grad_q_taken.dtype
        softcap = ctx.cfg[2]
        if ctx.filtered is not None:
            grad_filter.record(ctx.cfg[3], **ctx.filtered)
        if softcap is not None:  # Q[a] = s * tanh(raw / s): d/d raw = 1 - (Q[a] / s)^2
            grad_q_taken = grad_q_taken * softcap_slope(capped_q_taken, softcap)
        grad_hq = grad_qw = grad_qb = None
        if ctx.needs_input_grad[1]:
            # dL/dh_q[t] = g_qa[t] * Wq[a_t] + g_v[t] * E_p[Wq]   (d V / d Q = p; capped: both times 1 - tanh^2)
            grad_hq = torch.addcmul(
                grad_value.unsqueeze(1) * expected_w, grad_q_taken.unsqueeze(1), q_weight[targets].to(sd)
            ).to(hq.dtype)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            grad_qw, grad_qb = _head_grads(ctx, base, hq, weight, q_weight, q_bias, targets, lse_c, grad_q_taken,
                                           grad_value)
        return None, grad_hq, None, grad_qw, grad_qb, None, None, None, None


def _head_grads(ctx, base, hq, weight, q_weight, q_bias, targets, lse_c, grad_q_taken, grad_value):
    """Second tiled pass: dL/dQ = g_qa * onehot(a) + g_v * p (times 1 - tanh^2 under a soft cap;
    ``grad_q_taken`` has its factor already), summed over tokens into Wq and bq. A tile's own
    softmax becomes the row's ``p`` with the weight ``exp(lse_c(tile) - lse_c(row))``. Filtering
    leaves out of ``dWq`` each token's lightest blocks within its budget, never the block of its
    target (``dbq``, a sum, stays exact)."""
    alpha_tilde, alpha_0, softcap, eps = ctx.cfg
    rows, columns = ctx.tiles
    vocab = q_weight.shape[0]
    sd = grad_q_taken.dtype
    want_w, want_b = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    grad_qw = torch.zeros(q_weight.shape, dtype=sd, device=q_weight.device) if want_w else None
    grad_qb = torch.zeros(q_weight.shape[0], dtype=sd, device=q_weight.device) if want_b else None
    filtering = want_w and eps > 0
    block_stats = _BlockStats(rows, columns, sd, hq.device) if filtering else None
    entries = skipped = 0
    with torch.no_grad():
        logits = ChunkLogits(base, hq, weight, q_weight, q_bias, rows, columns)
        for s, e in chunks(hq.shape[0], rows):
            rows_here = torch.arange(e - s, device=hq.device)
            dropped = torch.zeros(e - s, dtype=sd, device=hq.device) if filtering else None
            for v0, v1 in chunks(vocab, columns):
                z, q = logits(s, e, v0, v1)
                stats = block_stats(e - s, v1 - v0) if filtering else None
                part_c, _, p = ctx.block_step(z, q, alpha_tilde, alpha_0, sd, block_stats=stats, softcap=softcap)
                del z, q
                to_row = (part_c - lse_c[s:e]).exp_()
                column, inside = _targets_in_tile(targets[s:e], v0, v1 - v0)
                drop = None
                if filtering:  # a token's own target block is never left out (its g_a term)
                    target = torch.where(inside, float("inf"), 0.0).to(sd).unsqueeze(1)
                    mass = (stats * to_row.unsqueeze(1)).scatter_add_(1, (column // FILTER_BLOCK).unsqueeze(1), target)
                    drop, left_out = grad_filter.leave_out(mass, eps * v1 / vocab, dropped, v1 - v0)
                    entries += p.numel()
                    skipped += left_out
                d_logits = p.mul_((to_row * grad_value[s:e]).unsqueeze(1))  # a capped step's p has its slope
                d_logits.index_put_((rows_here, column), torch.where(inside, grad_q_taken[s:e], 0.0), accumulate=True)
                if want_w:
                    _add_head_weight_grad_(grad_qw[v0:v1], d_logits, hq[s:e], drop)
                if want_b:
                    grad_qb[v0:v1].add_(d_logits.sum(dim=0))
    if filtering:
        grad_filter.record(eps, head_entries=entries, head_skipped=skipped)
    return (
        grad_qw.to(q_weight.dtype) if want_w else None,
        grad_qb.to(q_bias.dtype) if want_b else None,
    )


class _BlockStats:
    """One reused buffer for the block steps' per-block sums of ``p`` (``steps.BlockStep``)."""

    def __init__(self, rows: int, columns: int, dtype: torch.dtype, device: torch.device):
        self.buffer = torch.empty(rows * -(-columns // FILTER_BLOCK), dtype=dtype, device=device)

    def __call__(self, rows: int, width: int) -> torch.Tensor:
        blocks = -(-width // FILTER_BLOCK)
        return self.buffer[: rows * blocks].view(rows, blocks)


def _kept_product(out_dtype: torch.dtype, p: torch.Tensor, w: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
    """``p @ w`` with each row's ``drop``-ped blocks left out (``grad_filter.leave_out``; None: all of
    it, one GEMM, as the exact path takes it): on a GPU one grouped kernel
    (``triton/kept_product.py``, whose float32 atomics sum in no fixed order), elsewhere and under
    ``torch.use_deterministic_algorithms`` :func:`gathered_product`."""
    if drop is None:
        return matmul_to(out_dtype, p, w)
    if (p.is_cuda and out_dtype == torch.float32 and p.dtype == w.dtype and _gpu_kernels() is not None
            and not torch.are_deterministic_algorithms_enabled()):
        return _gpu_kernels().kept_blocks_product(p, w, drop)
    return gathered_product(out_dtype, p, w, drop)


def gathered_product(out_dtype: torch.dtype, p: torch.Tensor, w: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """``p @ w`` without each row's ``drop``-ped blocks: one GEMM per run of blocks that every row
    keeps and one per other block over the rows that keep it (``grad_filter.kept_parts``), added
    back by row. On a CPU the GEMMs run at their peak; on a GPU each block costs a host sync."""
    out = torch.zeros(p.shape[0], w.shape[1], dtype=out_dtype, device=p.device)
    for a, b, kept in grad_filter.kept_parts(drop, p.shape[1]):
        if kept is None:
            out.add_(matmul_to(out_dtype, p[:, a:b], w[a:b]))
        else:
            out.index_add_(0, kept, matmul_to(out_dtype, p[kept, a:b], w[a:b]))
    return out


def _add_head_weight_grad_(out: torch.Tensor, d_logits: torch.Tensor, h: torch.Tensor,
                           drop: torch.Tensor | None) -> None:
    """``out += d_logits^T @ h`` (a tile's ``dWq``) without each row's ``drop``-ped blocks (None: all
    of it): on a GPU one kernel (``triton/kept_product.py``), elsewhere one GEMM per part of
    ``grad_filter.kept_parts`` over the rows that keep it."""
    if drop is None:
        out.add_(_head_weight_grad(d_logits, h))
    elif d_logits.is_cuda and d_logits.dtype == torch.float32 and _gpu_kernels() is not None:
        _gpu_kernels().kept_blocks_head_product_(out, d_logits, h, drop)
    else:
        for a, b, kept in grad_filter.kept_parts(drop, d_logits.shape[1]):
            out[a:b].add_(_head_weight_grad(d_logits[:, a:b], h) if kept is None
                          else _head_weight_grad(d_logits[kept, a:b], h[kept]))


@functools.cache
def _gpu_kernels():
    """The Triton kept-blocks products (``triton/kept_product.py``), or None where triton does not
    import (the gathered GEMMs then serve a GPU too, more slowly)."""
    try:
        from .triton import kept_product
    except ImportError:
        return None
    return kept_product
